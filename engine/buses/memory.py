"""The embedded, in-process bus.

A real implementation of :class:`engine.bus.Bus`, not a mock: partitioned topics,
consumer groups that split partitions between members, committed offsets, and
redelivery of what a closed member had not committed. Everything lives in this
process's memory, so it is for the single-process embedded mode and for tests.

``join(topic, group)`` is a test and demo helper: it blocks until the group has
committed everything published to the topic so far.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Iterable, Sequence

from engine.bus import Bus, Consumer, Message, RevokeCallback
from kvadrupel.errors import BusError

__all__ = ["MemoryBus"]


class _Topic:
    def __init__(self, partitions: int) -> None:
        self.logs: list[list[Message]] = [[] for _ in range(partitions)]


class _Group:
    def __init__(self) -> None:
        self.members: list[_MemoryConsumer] = []
        self.committed: dict[tuple[str, int], int] = {}


class MemoryBus(Bus):
    def __init__(self, prefix: str = "kvadrupel", partitions: int = 4) -> None:
        super().__init__(prefix)
        self.default_partitions = partitions
        self._topics: dict[str, _Topic] = {}
        self._groups: dict[str, _Group] = {}
        self._cond = threading.Condition()
        self._closed = False

    # -- producer side -------------------------------------------------------
    def ensure_topics(self, names: Iterable[str], partitions: int) -> None:
        with self._cond:
            for name in names:
                self._topics.setdefault(name, _Topic(partitions))

    def _topic(self, name: str) -> _Topic:
        topic = self._topics.get(name)
        if topic is None:
            topic = self._topics[name] = _Topic(self.default_partitions)
        return topic

    def publish(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        if self._closed:
            raise BusError("bus is closed")
        with self._cond:
            t = self._topic(topic)
            n = len(t.logs)
            part = (zlib.crc32(key) % n) if key is not None else (sum(map(len, t.logs)) % n)
            log = t.logs[part]
            log.append(Message(topic, part, len(log), key, value))
            self._cond.notify_all()

    def flush(self, timeout: float = 30.0) -> None:
        # publish() appends synchronously: nothing is ever in flight.
        return None

    # -- consumer side -------------------------------------------------------
    def consumer(self, group: str, topics: Sequence[str], *,
                 on_revoke: RevokeCallback | None = None) -> Consumer:
        with self._cond:
            for name in topics:
                self._topic(name)
            g = self._groups.setdefault(group, _Group())
            member = _MemoryConsumer(self, g, list(topics), on_revoke)
            g.members.append(member)
            self._rebalance(g)
            return member

    def _rebalance(self, group: _Group) -> None:
        """Split partitions round-robin; every member restarts from committed offsets."""
        pairs: list[tuple[str, int]] = []
        topics = sorted({t for m in group.members for t in m.topics})
        for name in topics:
            pairs += [(name, p) for p in range(len(self._topics[name].logs))]
        members = group.members
        for m in members:
            if m._assigned and m.on_revoke is not None:
                m.on_revoke(sorted(m._assigned))
            m._assigned = {}
        for i, (name, p) in enumerate(pairs):
            eligible = [m for m in members if name in m.topics]
            if eligible:
                owner = eligible[i % len(eligible)]
                owner._assigned[(name, p)] = group.committed.get((name, p), 0)
        self._cond.notify_all()

    def _leave(self, member: _MemoryConsumer) -> None:
        with self._cond:
            g = member.group
            if member in g.members:
                g.members.remove(member)
                self._rebalance(g)

    def join(self, topic: str, group: str, timeout: float = 30.0) -> None:
        """Block until ``group`` has committed every message of ``topic``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                t = self._topic(topic)
                g = self._groups.get(group)
                done = g is not None and all(
                    g.committed.get((topic, p), 0) >= len(log) for p, log in enumerate(t.logs)
                )
                if done:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"group {group} did not drain {topic} in {timeout}s")
                self._cond.wait(min(left, 0.05))

    def pending(self, topic: str, group: str) -> int:
        """Messages of ``topic`` not yet committed by ``group``."""
        with self._cond:
            t = self._topic(topic)
            g = self._groups.get(group)
            committed = g.committed if g else {}
            return sum(len(log) - committed.get((topic, p), 0) for p, log in enumerate(t.logs))

    def messages(self, topic: str) -> list[Message]:
        """Every message of ``topic`` (test helper)."""
        with self._cond:
            return [m for log in self._topic(topic).logs for m in log]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class _MemoryConsumer(Consumer):
    def __init__(self, bus: MemoryBus, group: _Group, topics: list[str],
                 on_revoke: RevokeCallback | None = None) -> None:
        self.bus = bus
        self.group = group
        self.topics = topics
        self.on_revoke = on_revoke
        # (topic, partition) -> next offset to hand out
        self._assigned: dict[tuple[str, int], int] = {}
        self._paused = False
        self._closed = False

    def poll(self, max_messages: int = 500, timeout: float = 0.1) -> list[Message]:
        deadline = time.monotonic() + timeout
        cond = self.bus._cond
        with cond:
            while True:
                if self._closed or self.bus._closed:
                    return []
                out: list[Message] = []
                if not self._paused:
                    for (name, p), pos in self._assigned.items():
                        log = self.bus._topics[name].logs[p]
                        if pos < len(log):
                            take = log[pos : pos + (max_messages - len(out))]
                            out += take
                            self._assigned[(name, p)] = pos + len(take)
                            if len(out) >= max_messages:
                                break
                if out:
                    return out
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                cond.wait(left)

    def commit(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        with self.bus._cond:
            top: dict[tuple[str, int], int] = {}
            for m in messages:
                k = (m.topic, m.partition)
                top[k] = max(top.get(k, -1), m.offset)
            for k, off in top.items():
                if k not in self._assigned:
                    raise BusError(f"partition {k} is not assigned to this consumer")
                self.group.committed[k] = max(self.group.committed.get(k, 0), off + 1)
            self.bus._cond.notify_all()

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        with self.bus._cond:
            self.bus._cond.notify_all()

    def assignment(self) -> list[tuple[str, int]]:
        with self.bus._cond:
            return sorted(self._assigned)

    def close(self) -> None:
        if not self._closed:
            if self._assigned and self.on_revoke is not None:
                self.on_revoke(sorted(self._assigned))
            self._closed = True
            self.bus._leave(self)
            self._assigned = {}
