"""Bounded waiting helpers for bus tests: every wait has a deadline, none sleeps blind.

The waits go through ``tests.fixtures.waiting.wait_for``: their deadlines scale
with ``KVADRUPEL_TEST_TIMEOUT_SCALE``."""

from __future__ import annotations

import time
from collections.abc import Sequence

from engine.bus import Consumer, Message
from tests.fixtures.waiting import wait_for

# Kafka (Tansu) group joins take ~1 s and takeovers ~3 s with the test timings;
# these deadlines are only hit when something is broken.
DEADLINE_S = 20.0
# How long "nothing arrives" is watched: many fetch.wait.max.ms (20 ms) periods.
QUIET_S = 0.3


def collect(
    consumers: Sequence[Consumer],
    count: int,
    *,
    commit: bool = True,
    timeout: float = DEADLINE_S,
) -> list[list[Message]]:
    """Poll every consumer in turn until ``count`` messages arrived in all.

    Returns one list per consumer. With ``commit`` each batch is committed as soon
    as it is received (the "ack"), as a worker would.
    """
    got: list[list[Message]] = [[] for _ in consumers]

    def poll_all() -> list[int]:
        if sum(map(len, got)) < count:
            for i, c in enumerate(consumers):
                batch = c.poll(max_messages=500, timeout=0.05)
                if batch:
                    got[i] += batch
                    if commit:
                        c.commit(batch)
        return [len(g) for g in got]

    wait_for(poll_all, f"{count} messages on {len(consumers)} consumers (messages per consumer)",
             until=lambda per: sum(per) >= count, timeout=timeout, every=0,
             retry_on=())  # a failed poll or commit fails the test, as it always did
    return got


def poll_for(consumers: Sequence[Consumer], seconds: float = QUIET_S) -> list[list[Message]]:
    """Poll every consumer for ``seconds``; what arrived, one list per consumer."""
    got: list[list[Message]] = [[] for _ in consumers]
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for i, c in enumerate(consumers):
            got[i] += c.poll(max_messages=500, timeout=0.05)
    return got


def settle(
    consumers: Sequence[Consumer],
    expected: set[tuple[str, int]],
    timeout: float = DEADLINE_S,
) -> list[set[tuple[str, int]]]:
    """Poll (which drives the group protocol) until the members split ``expected``.

    Every member holds something, no partition is held twice, none is missing.
    Nothing may be delivered meanwhile: call it before publishing.
    """

    def assignments() -> list[set[tuple[str, int]]]:
        for c in consumers:
            stray = c.poll(max_messages=500, timeout=0.05)
            assert stray == [], f"messages delivered while settling: {stray}"
        return [set(c.assignment()) for c in consumers]

    def settled(held: list[set[tuple[str, int]]]) -> bool:
        union = set().union(*held)
        return all(held) and sum(map(len, held)) == len(union) and union == expected

    return wait_for(assignments, f"the group to settle on {sorted(expected)} (assignments)",
                    until=settled, timeout=timeout, every=0)


def values(messages: Sequence[Message]) -> list[bytes]:
    return [m.value for m in messages]


def partitions_of(bus_topic: str, n: int) -> set[tuple[str, int]]:
    return {(bus_topic, p) for p in range(n)}
