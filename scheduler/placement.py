"""Message keys that spread a run's range jobs evenly over the jobs topic's partitions.

Evaluators share the jobs topic as one consumer group: each member owns some
partitions and works through the ranges in them. Keys hashed at random put, say,
50 ranges on 8 partitions as 4..9 per partition, and the worker that owns the
fuller ones finishes last while the others idle. So the planner picks, for the
i-th range, a key the bus's partitioner sends to partition ``i mod P``: with P a
multiple of the number of workers, every worker gets the same number of ranges.

This needs the partitioner and the partition count, which the :class:`Bus`
interface does not expose; the two implementations' are known here
(``KafkaBus``: the Java client's murmur2, as configured there; ``MemoryBus``:
CRC32). For any other bus, or when the topic's metadata cannot be read, plain
keys are used (still correct, only less even).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from typing import Any

from engine.bus import Bus

__all__ = ["murmur2", "partitioner_of", "spread_keys"]

log = logging.getLogger("kvadrupel.scheduler")

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (the Java client's ``Utils.murmur2``, seed 0x9747b28c), as an
    unsigned 32-bit int. The partition of a key is ``(murmur2(key) & 0x7fffffff) % P``."""
    length = len(data)
    h = (0x9747B28C ^ length) & _MASK
    n4 = length & ~3
    for i in range(0, n4, 4):
        k = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24)
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    rest = length & 3
    if rest == 3:
        h ^= data[n4 + 2] << 16
    if rest >= 2:
        h ^= data[n4 + 1] << 8
    if rest >= 1:
        h ^= data[n4]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


def partitioner_of(bus: Bus, topic: str) -> tuple[Callable[[bytes], int], int] | None:
    """``(partition_of(key), partitions)`` for the known buses, else None."""
    try:
        from engine.buses.memory import MemoryBus

        if isinstance(bus, MemoryBus):
            n = len(bus._topic(topic).logs)
            return (lambda key: zlib.crc32(key) % n), n
        from engine.buses.kafka import KafkaBus

        if isinstance(bus, KafkaBus):
            if bus._producer_conf.get("partitioner") != "murmur2_random":
                return None
            md: Any = bus._admin_client().list_topics(topic, timeout=10).topics.get(topic)
            if md is None or md.error is not None or not md.partitions:
                return None
            n = len(md.partitions)
            return (lambda key: (murmur2(key) & 0x7FFFFFFF) % n), n
    except Exception as exc:  # noqa: BLE001 - an uneven spread is better than no run
        log.warning("cannot read the partitions of %s (%s): using plain keys", topic, exc)
    return None


def spread_keys(bus: Bus, topic: str, names: Sequence[str]) -> list[bytes]:
    """One key per name, the i-th landing on partition ``i mod P`` (``name`` or
    ``name~salt``: keys stay readable)."""
    found = partitioner_of(bus, topic)
    if found is None:
        return [n.encode() for n in names]
    part, n = found
    keys = []
    for i, name in enumerate(names):
        want = i % n
        key = name.encode()
        salt = 0
        while part(key) != want:
            salt += 1
            key = f"{name}~{salt}".encode()
        keys.append(key)
    return keys
