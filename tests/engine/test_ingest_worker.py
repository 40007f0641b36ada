"""The ingest worker on both buses: aggregation, re-evaluation requests, dead letters."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from engine.bus import Bus
from engine.buses.memory import MemoryBus
from engine.ingest import IngestWorker
from shards.backends.sqlite import SqliteShardStore
from shards.migrations import runner
from shards.router import ShardRouter
from shards.shardset import ShardSet


@pytest.fixture(params=["memory", pytest.param("kafka", marks=pytest.mark.kafka)])
def bus(request: pytest.FixtureRequest) -> Iterator[Bus]:
    if request.param == "memory":
        b = MemoryBus(f"t{uuid.uuid4().hex[:12]}", partitions=4)
        b.ensure_topics(b.topics.values(), 4)
        yield b
        b.close()
    else:
        yield request.getfixturevalue("kafka_bus")


@pytest.fixture
def shards(tmp_path: Path) -> Iterator[ShardSet]:
    stores = []
    for i in range(2):
        s = SqliteShardStore.from_url(i, f"sqlite:///{tmp_path / f's{i}.db'}")
        runner.upgrade("shard", s.engine)
        stores.append(s)
    ss = ShardSet(ShardRouter.uniform(2), stores)
    yield ss
    ss.close()


def drain(bus: Bus, topic: str, expect: int, timeout: float = 15.0, done=None) -> list:  # noqa: ANN001
    consumer = bus.consumer(f"{bus.prefix}-reader-{uuid.uuid4().hex[:6]}", [topic])
    got: list = []
    done = done or (lambda msgs: len(msgs) >= expect)
    deadline = time.monotonic() + timeout
    try:
        while not done(got) and time.monotonic() < deadline:
            got += consumer.poll(100, 0.2)
    finally:
        consumer.close()
    return got


def run_until(worker: IngestWorker, handled: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while worker.handled < handled:
        assert time.monotonic() < deadline, f"handled {worker.handled} of {handled}"
        worker.step()


def test_bad_messages_go_to_the_dlq_and_the_rest_proceeds(bus: Bus, shards: ShardSet) -> None:
    # Given good events, a poison message and an event that breaks on the stored profile
    events = bus.topic("events")
    good = [{"event_id": f"g{i}", "user_id": 100 + i % 5, "inc": {"orders.total": 1}} for i in range(20)]
    for e in good[:10]:
        bus.publish(events, orjson.dumps(e), key=str(e["user_id"]).encode())
    bus.publish(events, b"\xff\xfe not json", key=b"100")
    bus.publish(events, orjson.dumps({"event_id": "x", "user_id": 100, "inc": {"orders.total.deep": 1}}),
                key=b"100")
    for e in good[10:]:
        bus.publish(events, orjson.dumps(e), key=str(e["user_id"]).encode())
    bus.flush()

    # When the worker consumes everything
    worker = IngestWorker(bus.consumer(f"{bus.prefix}-ingest", [events]), bus, shards, max_bytes=65536)
    try:
        run_until(worker, 22)
    finally:
        worker.close()

    # Then every good event applied exactly once per user...
    for uid in range(100, 105):
        assert shards.for_user(uid).get_profile(uid) == {"orders": {"total": 4}}
    # ...the two bad messages are dead-lettered with their cause and original bytes...
    dlq = [orjson.loads(m.value) for m in drain(bus, bus.topic("events.dlq"), 2)]
    assert len(dlq) == 2
    by_cause = {("JSON" in d["cause"]): d for d in dlq}
    assert by_cause[True]["encoding"] == "base64"
    assert "not an object" in by_cause[False]["cause"] and by_cause[False]["event_id"] == "x"
    # ...and a re-evaluation was requested for each changed user, per shard
    def users_in(msgs: list) -> list[int]:
        return sorted({u for m in msgs for u in orjson.loads(m.value)["user_ids"]})

    msgs = drain(bus, bus.topic("jobs"), 0, done=lambda got: users_in(got) == list(range(100, 105)))
    jobs = [orjson.loads(m.value) for m in msgs]
    assert sorted({u for j in jobs for u in j["user_ids"]}) == list(range(100, 105))
    assert all(shards.router.shard_of(u) == j["shard"] for j in jobs for u in j["user_ids"])
