"""Message keys that spread a run's range jobs evenly over the jobs topic's partitions.

Evaluators share the jobs topic as one consumer group: each member owns some
partitions and works through the ranges in them. Keys hashed at random put, say,
50 ranges on 8 partitions as 4..9 per partition, and the worker that owns the
fuller ones finishes last while the others idle. So the planner picks, for the
i-th range, a key the bus puts on partition ``i mod P`` (:meth:`Bus.partition_of`):
with P a multiple of the number of workers, every worker gets the same number of
ranges. When the bus cannot tell (an unknown partitioner, the topic's metadata
unreadable), plain keys are used (still correct, only less even).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from base.errors import BusError
from engine.bus import Bus

__all__ = ["spread_keys"]

log = logging.getLogger("kvadrupel.scheduler")


def spread_keys(bus: Bus, topic: str, names: Sequence[str]) -> list[bytes]:
    """One key per name, the i-th landing on partition ``i mod P`` (``name`` or
    ``name~salt``: keys stay readable)."""
    try:
        n = bus.partition_count(topic)
        keys = []
        for i, name in enumerate(names):
            want = i % n
            key = name.encode()
            salt = 0
            while bus.partition_of(topic, key) != want:
                salt += 1
                key = f"{name}~{salt}".encode()
            keys.append(key)
    except BusError as exc:  # an uneven spread is better than no run
        log.warning("cannot place keys on the partitions of %s (%s): using plain keys",
                    topic, exc)
        return [name.encode() for name in names]
    return keys
