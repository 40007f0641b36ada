"""The embedded, in-process bus.

A real implementation of :class:`engine.bus.Bus`, not a mock: partitioned topics,
consumer groups that split partitions between members, committed offsets, and
redelivery of what a closed member had not committed. Consumers live in this
process: the bus is for the single-process embedded mode and for tests.

Without ``path`` everything is in memory (tests that need speed). With ``path`` the
bus also keeps a durable log (:mod:`engine.buses.durable`, one SQLite file):
``publish`` queues a message, one writer thread appends everything queued to the
log in one transaction (group commit), and only then do consumers see it;
``flush`` returns once every message published before it is in the log, or raises
:class:`BusError` when one of them could not be written. Committed offsets go to
the log as well, and what every group has committed is trimmed from it. On a
restart the bus reloads the topics, the untrimmed messages *with their offsets*
and each group's committed offsets: consumers resume where their group committed
(at least once; a message handed out but not committed is delivered again).

``join(topic, group)`` is a test and demo helper: it blocks until the group has
committed everything published to the topic so far.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from base.errors import BusError
from engine.bus import Bus, Consumer, Message, RevokeCallback
from engine.buses.durable import SqliteLog

__all__ = ["MemoryBus"]


class _Topic:
    def __init__(self, partitions: int) -> None:
        self.logs: list[list[Message]] = [[] for _ in range(partitions)]
        # Offset of logs[p][0]: above 0 once the durable log trimmed the head.
        self.base: list[int] = [0] * partitions

    def end(self, p: int) -> int:
        """The offset the next message of partition ``p`` gets."""
        return self.base[p] + len(self.logs[p])


class _Group:
    def __init__(self, name: str = "") -> None:
        self.name = name
        self.members: list[_MemoryConsumer] = []
        self.committed: dict[tuple[str, int], int] = {}


class MemoryBus(Bus):
    def __init__(self, prefix: str = "kvadrupel", partitions: int = 4, *,
                 path: str | Path | None = None, synchronous: str = "FULL") -> None:
        """``path``: the durable log's file (None: memory only); ``synchronous``: its
        appends' SQLite sync level (see :mod:`engine.buses.durable`). The log is
        opened, and its lock taken, on first use (a publish, a consumer), not here."""
        super().__init__(prefix)
        self.default_partitions = partitions
        self._topics: dict[str, _Topic] = {}
        self._groups: dict[str, _Group] = {}
        lock = threading.RLock()
        self._cond = threading.Condition(lock)  # consumers wait for messages on it
        self._closed = False
        # -- durable mode ----------------------------------------------------------
        self.path = Path(path) if path is not None else None
        self._synchronous = synchronous
        self._log: SqliteLog | None = None
        self._wake = threading.Condition(lock)  # the writer waits for work on it
        self._pending: list[tuple[int, str, int, bytes | None, bytes]] = []
        self._seq = 0  # last sequence number given to a published message
        self._written = 0  # every message up to this sequence number is handled
        self._failures: list[tuple[int, int, str]] = []  # (first, last seq, error)
        self._unkeyed = 0
        self._writer: threading.Thread | None = None
        self._mine = threading.local()  # per thread: seq before its first unflushed publish

    # -- durable log -------------------------------------------------------------
    def _open(self) -> None:
        """Open the durable log once (under the lock): reload topics, messages and
        committed offsets, then start the writer thread."""
        if self.path is None or self._log is not None:
            return
        if self._closed:
            raise BusError("bus is closed")
        log = SqliteLog(self.path, synchronous=self._synchronous)
        try:
            state = log.load()
            created = dict(self._topics)  # ensure_topics before the first use
            self._topics = {}
            for name, n in state.topics.items():
                t = self._topics[name] = _Topic(n)
                for p in range(n):
                    rows = state.messages.get((name, p), [])
                    start = rows[0][0] if rows else state.starts.get((name, p), 0)
                    if any(off != start + i for i, (off, _, _) in enumerate(rows)):
                        raise BusError(f"bus log {self.path}: {name}/{p} has a gap")
                    t.base[p] = start
                    t.logs[p] = [Message(name, p, off, k, v) for off, k, v in rows]
            for name, t in created.items():
                if name not in self._topics:
                    log.add_topic(name, len(t.logs))
                    self._topics[name] = _Topic(len(t.logs))
            for name, offsets in state.commits.items():
                g = self._groups.setdefault(name, _Group(name))
                for k, off in offsets.items():
                    g.committed[k] = max(g.committed.get(k, 0), off)
        except BaseException:
            log.close()
            raise
        self._log = log
        self._writer = threading.Thread(target=self._write_loop, name="bus-log-writer",
                                        daemon=True)
        self._writer.start()

    def _write_loop(self) -> None:
        """Append what was published to the log, a group at a time; then show it."""
        assert self._log is not None
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._wake.wait()
                if not self._pending:
                    return  # closed and drained
                batch, self._pending = self._pending, []
                # Offsets are given here: only this thread appends in durable mode.
                ends: dict[tuple[str, int], int] = {}
                msgs = []
                for _, topic, part, key, value in batch:
                    k = (topic, part)
                    off = ends.get(k, self._topics[topic].end(part))
                    ends[k] = off + 1
                    msgs.append(Message(topic, part, off, key, value))
            error = None
            try:  # outside the lock: publishers and consumers carry on meanwhile
                self._log.append((m.topic, m.partition, m.offset, m.key, m.value) for m in msgs)
            except BusError as exc:
                error = str(exc)
            with self._cond:
                if error is None:
                    for m in msgs:
                        self._topics[m.topic].logs[m.partition].append(m)
                else:  # dropped: their flush raises, the publisher retries
                    self._failures = [*self._failures[-99:], (batch[0][0], batch[-1][0], error)]
                self._written = batch[-1][0]
                self._cond.notify_all()

    def _wait_written(self, target: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._written < target:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BusError(f"bus log: messages not written in {timeout}s")
            if self._writer is None or not self._writer.is_alive():
                raise BusError("bus log writer is not running")
            self._cond.wait(min(left, 0.5))

    def _trims(self, group: _Group,
               committing: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        """Per partition ``group`` is committing (``committing``: partition -> offset),
        the offset below which every interested group committed, where that moves the
        log's start.
        Interested: groups with a member on the topic or a committed offset on it;
        a topic nobody consumes (a dead-letter topic) is kept whole."""
        out = {}
        for name, p in committing:
            low = None
            for g in self._groups.values():
                if any(name in m.topics for m in g.members) or any(
                        t == name for t, _ in g.committed):
                    c = g.committed.get((name, p), 0)
                    if g is group:
                        c = max(c, committing.get((name, p), 0))
                    low = c if low is None else min(low, c)
            if low is not None and low > self._topics[name].base[p]:
                out[(name, p)] = low
        return out

    def _trim_memory(self, trims: dict[tuple[str, int], int]) -> None:
        for (name, p), below in trims.items():
            t = self._topics[name]
            drop = min(below, t.end(p)) - t.base[p]
            if drop > 0:
                del t.logs[p][:drop]
                t.base[p] += drop

    # -- producer side -------------------------------------------------------
    def ensure_topics(self, names: Iterable[str], partitions: int) -> None:
        with self._cond:
            for name in names:
                self._new_topic(name, partitions)

    def _topic(self, name: str) -> _Topic:
        self._open()  # durable: a topic's partition count is the log's
        topic = self._topics.get(name)
        if topic is None:
            topic = self._new_topic(name, self.default_partitions)
        return topic

    def _new_topic(self, name: str, partitions: int) -> _Topic:
        # A topic's partition count is fixed once it has one: a durable log keeps
        # the count it was created with (keys must map where they mapped before).
        topic = self._topics.get(name)
        if topic is None:
            if self._log is not None:
                self._log.add_topic(name, partitions)
            topic = self._topics[name] = _Topic(partitions)
        return topic

    def publish(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        if self._closed:
            raise BusError("bus is closed")
        with self._cond:
            t = self._topic(topic)  # (durable: opens the log first)
            n = len(t.logs)
            if key is not None:
                part = self._place(key, n)
            else:
                part, self._unkeyed = self._unkeyed % n, self._unkeyed + 1
            if self.path is not None:
                self._queue_durable(topic, part, key, value)
                return
            t.logs[part].append(Message(topic, part, t.end(part), key, value))
            self._cond.notify_all()

    @staticmethod
    def _place(key: bytes, partitions: int) -> int:
        """The partition of a keyed message (what :meth:`partition_of` tells)."""
        return zlib.crc32(key) % partitions

    def _queue_durable(self, topic: str, part: int, key: bytes | None, value: bytes) -> None:
        """Hand the message to the log writer (it gets its offset there)."""
        self._seq += 1
        if getattr(self._mine, "since", None) is None:
            self._mine.since = self._seq - 1
        self._pending.append((self._seq, topic, part, key, value))
        self._wake.notify()

    def flush(self, timeout: float = 30.0) -> None:
        if self.path is None:
            # publish() appends synchronously: nothing is ever in flight.
            return None
        with self._cond:
            target = self._seq
            since, self._mine.since = getattr(self._mine, "since", None), None
            self._wait_written(target, timeout)
            if since is not None:
                # Conservative: a failed group that holds a message this thread
                # published since its last flush fails this flush (it may also
                # hold other threads' messages; a retry is harmless).
                failed = [f for f in self._failures if f[1] > since and f[0] <= target]
                if failed:
                    raise BusError(f"messages not written to the bus log: {failed[-1][2]}")
        return None

    def partition_count(self, topic: str) -> int:
        with self._cond:
            return len(self._topic(topic).logs)

    def partition_of(self, topic: str, key: bytes) -> int:
        return self._place(key, self.partition_count(topic))

    # -- consumer side -------------------------------------------------------
    def consumer(self, group: str, topics: Sequence[str], *,
                 on_revoke: RevokeCallback | None = None) -> Consumer:
        with self._cond:
            self._open()
            for name in topics:
                self._topic(name)
            g = self._groups.setdefault(group, _Group(group))
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
                # A new group starts at the oldest message the log still has.
                owner._assigned[(name, p)] = max(group.committed.get((name, p), 0),
                                                 self._topics[name].base[p])
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
            if self.path is not None:  # what was published before the call
                self._open()
                self._wait_written(self._seq, timeout)
            while True:
                t = self._topic(topic)
                g = self._groups.get(group)
                done = g is not None and all(
                    g.committed.get((topic, p), 0) >= t.end(p) for p in range(len(t.logs))
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
            self._open()
            t = self._topic(topic)
            g = self._groups.get(group)
            committed = g.committed if g else {}
            waiting = sum(1 for m in self._pending if m[1] == topic)  # not yet in the log
            return waiting + sum(t.end(p) - max(committed.get((topic, p), 0), t.base[p])
                                 for p in range(len(t.logs)))

    def messages(self, topic: str) -> list[Message]:
        """Every message of ``topic`` still kept (test helper; after a flush)."""
        with self._cond:
            self._open()
            return [m for log in self._topic(topic).logs for m in log]

    def close(self) -> None:
        """Write what was published, stop the writer, close the log."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._wake.notify_all()
            writer, log = self._writer, self._log
        if writer is not None:
            writer.join(timeout=30)
        if log is not None:
            log.close()


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
                        t = self.bus._topics[name]
                        i = max(pos - t.base[p], 0)
                        if i < len(t.logs[p]):
                            take = t.logs[p][i : i + (max_messages - len(out))]
                            out += take
                            self._assigned[(name, p)] = take[-1].offset + 1
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
        bus = self.bus
        with bus._cond:
            top: dict[tuple[str, int], int] = {}
            for m in messages:
                k = (m.topic, m.partition)
                top[k] = max(top.get(k, -1), m.offset)
            for k in top:
                if k not in self._assigned:
                    raise BusError(f"partition {k} is not assigned to this consumer")
            ahead = {k: off + 1 for k, off in top.items()
                     if off + 1 > self.group.committed.get(k, 0)}
            trims = bus._trims(self.group, ahead) if bus._log is not None else {}
        if bus._log is not None and ahead:
            # Outside the lock (the writer may hold the file for an fsync), and
            # before memory changes: memory never claims more than the log has.
            bus._log.commit(self.group.name, ahead, trims)
        with bus._cond:
            for k, off in ahead.items():
                self.group.committed[k] = max(self.group.committed.get(k, 0), off)
            bus._trim_memory(trims)
            bus._cond.notify_all()

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
