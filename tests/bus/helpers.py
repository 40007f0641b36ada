"""Bounded waiting helpers for bus tests: every wait has a deadline, none sleeps blind."""

from __future__ import annotations

import time
from collections.abc import Sequence

from engine.bus import Consumer, Message

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
    deadline = time.monotonic() + timeout
    while sum(map(len, got)) < count:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"got {sum(map(len, got))} of {count} messages in {timeout}s: {got}"
            )
        for i, c in enumerate(consumers):
            batch = c.poll(max_messages=500, timeout=0.05)
            if batch:
                got[i] += batch
                if commit:
                    c.commit(batch)
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
    deadline = time.monotonic() + timeout
    while True:
        for c in consumers:
            stray = c.poll(max_messages=500, timeout=0.05)
            assert stray == [], f"messages delivered while settling: {stray}"
        held = [set(c.assignment()) for c in consumers]
        union = set().union(*held)
        disjoint = sum(map(len, held)) == len(union)
        if all(held) and disjoint and union == expected:
            return held
        if time.monotonic() > deadline:
            raise AssertionError(
                f"group did not settle on {sorted(expected)} in {timeout}s: {held}"
            )


def values(messages: Sequence[Message]) -> list[bytes]:
    return [m.value for m in messages]


def partitions_of(bus_topic: str, n: int) -> set[tuple[str, int]]:
    return {(bus_topic, p) for p in range(n)}
