"""The embedded bus's durable log (engine/buses/durable.py through MemoryBus(path=...)).

The bus contract itself runs on the durable bus too (the ``durable`` parameter of
the ``bus`` fixture); these tests check what only a durable log has: offsets that
survive a reopen unchanged, committed offsets per group, trimming, a real process
killed with SIGKILL right after a flush, one process per log, failed writes.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from base.errors import BusError
from engine.bus import Message
from engine.buses.memory import MemoryBus
from tests.bus.helpers import collect, poll_for

PARTS = 4
ROOT = Path(__file__).resolve().parents[2]


def open_bus(path: Path, partitions: int = PARTS) -> MemoryBus:
    bus = MemoryBus("d", partitions=partitions, path=path)
    bus.ensure_topics(bus.topics.values(), partitions)
    return bus


def publish(bus: MemoryBus, values: list[bytes], keys: int = 8) -> None:
    for i, v in enumerate(values):
        bus.publish(bus.topic("events"), v, key=f"user-{i % keys}".encode())
    bus.flush()


def coords(messages: list[Message]) -> set[tuple[int, int, bytes | None, bytes]]:
    return {(m.partition, m.offset, m.key, m.value) for m in messages}


def stored_rows(path: Path) -> int:
    db = sqlite3.connect(path)  # the bus is closed: its lock is released
    try:
        return db.execute("SELECT count(*) FROM messages").fetchone()[0]
    finally:
        db.close()


def test_a_reopened_log_has_the_same_messages_at_the_same_offsets(tmp_path: Path) -> None:
    # Given messages flushed to a durable bus, half of them consumed and committed
    path = tmp_path / "bus.db"
    bus = open_bus(path)
    publish(bus, [f"m{i}".encode() for i in range(40)])
    before = bus.messages(bus.topic("events"))
    with bus.consumer("g", [bus.topic("events")]) as c:
        (got,) = collect([c], 40, commit=False)
        per_part: dict[int, list[Message]] = {}
        for m in sorted(got, key=lambda m: m.offset):
            per_part.setdefault(m.partition, []).append(m)
        done = [m for msgs in per_part.values() for m in msgs[: len(msgs) // 2]]
        c.commit(done)
    bus.close()

    # When the bus is opened again (as a restarted process would)
    again = open_bus(path)
    try:
        # Then the group gets exactly what it had not committed, at the same
        # (partition, offset), with the same key and value
        with again.consumer("g", [again.topic("events")]) as c:
            (redelivered,) = collect([c], 40 - len(done))
            (late,) = poll_for([c])
        assert late == []
        assert coords(redelivered) == coords(before) - coords(done)
        # and new messages continue each partition's offsets
        publish(again, [b"new"], keys=1)
        (new,) = [m for m in again.messages(again.topic("events")) if m.value == b"new"]
        old_end = max(m.offset for m in before if m.partition == new.partition) + 1
        assert new.offset == old_end
    finally:
        again.close()


def test_committed_offsets_are_kept_per_group_and_trimmed_to_the_slowest(tmp_path: Path) -> None:
    # Given two groups on one topic: "fast" committed everything, "slow" nothing
    path = tmp_path / "bus.db"
    bus = open_bus(path)
    sent = [f"m{i}".encode() for i in range(30)]
    publish(bus, sent)
    slow = bus.consumer("slow", [bus.topic("events")])
    with bus.consumer("fast", [bus.topic("events")]) as fast:
        collect([fast], 30)
    # Then nothing may be trimmed yet: "slow" still needs it all
    slow.close()
    bus.close()
    assert stored_rows(path) == 30

    # When the bus is reopened and "slow" catches up
    bus = open_bus(path)
    with bus.consumer("fast", [bus.topic("events")]) as fast:
        (nothing,) = poll_for([fast])
    with bus.consumer("slow", [bus.topic("events")]) as slow_again:
        (got,) = collect([slow_again], 30)
    bus.close()

    # Then each group resumed from its own offsets, and the log is empty now
    assert nothing == []
    assert sorted(m.value for m in got) == sorted(sent)
    assert stored_rows(path) == 0


def test_offsets_continue_after_a_trim_emptied_the_log(tmp_path: Path) -> None:
    # Given a log whose every message was consumed, committed and trimmed
    path = tmp_path / "bus.db"
    bus = open_bus(path)
    publish(bus, [f"m{i}".encode() for i in range(20)], keys=1)
    with bus.consumer("g", [bus.topic("events")]) as c:
        (first,) = collect([c], 20)
    bus.close()
    assert stored_rows(path) == 0

    # When it is reopened and a message is published with the same key
    bus = open_bus(path)
    try:
        publish(bus, [b"after"], keys=1)
        with bus.consumer("g", [bus.topic("events")]) as c:
            (got,) = collect([c], 1)
    finally:
        bus.close()

    # Then it gets the next offset of its partition: offsets are never reused
    assert [m.value for m in got] == [b"after"]
    assert got[0].partition == first[0].partition
    assert got[0].offset == max(m.offset for m in first) + 1 == 20


def test_a_topic_keeps_its_partition_count_across_reopens(tmp_path: Path) -> None:
    # Given a topic created with 4 partitions
    path = tmp_path / "bus.db"
    bus = open_bus(path, partitions=4)
    publish(bus, [b"x"])
    bus.close()

    # When the bus is reopened asking for 8
    bus = open_bus(path, partitions=8)
    try:
        # Then keys still map to the partitions they mapped to before
        assert bus.partition_count(bus.topic("events")) == 4
    finally:
        bus.close()


def test_a_flushed_message_survives_sigkill(tmp_path: Path) -> None:
    # Given a process that publishes, flushes, says so, and is killed with SIGKILL
    # at once (no close, no exit handlers)
    path = tmp_path / "bus.db"
    script = f"""
import os, signal
from engine.buses.memory import MemoryBus
bus = MemoryBus("d", partitions={PARTS}, path={str(path)!r})
for i in range(500):
    bus.publish(bus.topic("events"), b"m%d" % i, key=b"k%d" % (i % 7))
bus.flush()
print("flushed", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          timeout=60)
    assert proc.stdout == b"flushed\n" and proc.returncode == -9, proc.stderr

    # When the log is opened again, then every flushed message is there
    bus = open_bus(path)
    try:
        with bus.consumer("g", [bus.topic("events")]) as c:
            (got,) = collect([c], 500)
    finally:
        bus.close()
    assert sorted(m.value for m in got) == sorted(b"m%d" % i for i in range(500))


def test_a_second_bus_on_the_same_log_is_refused(tmp_path: Path) -> None:
    # Given a durable bus in use
    path = tmp_path / "bus.db"
    bus = open_bus(path)
    publish(bus, [b"x"])
    other = MemoryBus("d", partitions=PARTS, path=path)
    try:
        # When another opens the same file, then it is told, before writing anything
        with pytest.raises(BusError, match="in use"):
            other.publish(other.topic("events"), b"y")
    finally:
        other.close()
        bus.close()


def test_a_failed_write_fails_the_flush_and_shows_nothing(tmp_path: Path) -> None:
    # Given a durable bus whose log refuses the next append (a full disk)
    bus = open_bus(tmp_path / "bus.db")
    try:
        publish(bus, [b"before"])
        log = bus._log
        assert log is not None
        real_append = log.append

        def refuse(rows: object) -> None:
            raise BusError("bus log: database or disk is full")

        log.append = refuse  # type: ignore[method-assign]
        # When a message is published and flushed
        bus.publish(bus.topic("events"), b"lost", key=b"k")
        with pytest.raises(BusError, match="disk is full"):
            bus.flush()
        # Then no consumer ever sees it, and the bus works again afterwards
        log.append = real_append  # type: ignore[method-assign]
        publish(bus, [b"after"])
        values = [m.value for m in bus.messages(bus.topic("events"))]
        assert sorted(values) == [b"after", b"before"]
    finally:
        bus.close()


def test_a_publish_without_flush_still_reaches_consumers(tmp_path: Path) -> None:
    # Given a durable bus and a consumer
    bus = open_bus(tmp_path / "bus.db")
    try:
        with bus.consumer("g", [bus.topic("jobs")]) as c:
            # When a message is published and nobody flushes
            bus.publish(bus.topic("jobs"), b"job", key=b"k")
            # Then the writer still appends it and the consumer gets it
            (got,) = collect([c], 1)
        assert [m.value for m in got] == [b"job"]
    finally:
        bus.close()


def test_the_embedded_default_is_durable_and_shared_by_containers_on_one_data_dir(
        tmp_path: Path) -> None:
    from kvadrupel.container import Container
    from kvadrupel.settings import Settings

    # Given two containers on one data dir with the default settings (embedded)
    settings = Settings(data_dir=tmp_path / "data")
    a, b = Container(settings), Container(settings)
    try:
        # When both use their bus
        bus = a.bus
        # Then it is one durable bus, with its log in the data dir
        assert b.bus is bus and isinstance(bus, MemoryBus)
        assert bus.path == (tmp_path / "data" / "bus.db").resolve()
        bus.publish(bus.topic("events"), b"e", key=b"1")
        bus.flush()
        # and it stays open until the last container closes (twice is once)
        a.close()
        a.close()
        b.bus.publish(bus.topic("events"), b"f", key=b"1")
        b.bus.flush()
    finally:
        a.close()
        b.close()
    assert stored_rows(tmp_path / "data" / "bus.db") == 2
