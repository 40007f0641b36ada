"""The ingest worker on both buses: aggregation, re-evaluation requests, dead letters,
commits that wait for every shard, and data a shard refuses."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from engine.bus import Bus
from engine.buses.memory import MemoryBus
from engine.ingest.worker import IngestWorker
from engine.messages.event import parse_event
from shards.backends.sqlite import SqliteShardStore
from shards.migrations import runner
from shards.router import ShardRouter
from shards.shardset import ShardSet, open_shard
from tests.engine.test_events import oracle
from tests.faults import pgcontrol
from tests.fixtures.waiting import wait_for


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
def memory_bus() -> Iterator[MemoryBus]:
    b = MemoryBus(f"t{uuid.uuid4().hex[:12]}", partitions=4)
    b.ensure_topics(b.topics.values(), 4)
    yield b
    b.close()


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


@pytest.fixture
def pg_shards(pg_factory) -> Iterator[tuple[ShardSet, list[str]]]:  # noqa: ANN001
    urls = pg_factory(2).shards
    ss = ShardSet(ShardRouter.uniform(2), [open_shard(i, u) for i, u in enumerate(urls)])
    yield ss, urls
    for url in urls:
        pgcontrol.up(url)
    ss.close()


def publish(bus: Bus, events: list) -> None:
    topic = bus.topic("events")
    for e in events:
        if isinstance(e, bytes):
            bus.publish(topic, e, key=b"1")
        else:
            bus.publish(topic, orjson.dumps(e), key=str(e["user_id"]).encode())
    bus.flush()


def worker(bus: Bus, shards: ShardSet, **kw: object) -> IngestWorker:
    return IngestWorker(bus.consumer(f"{bus.prefix}-ingest", [bus.topic("events")]), bus, shards,
                        max_bytes=65536, **kw)  # type: ignore[arg-type]


def drain(bus: Bus, topic: str, expect: int, timeout: float = 15.0, done=None) -> list:  # noqa: ANN001
    consumer = bus.consumer(f"{bus.prefix}-reader-{uuid.uuid4().hex[:6]}", [topic])
    got: list = []
    done = done or (lambda msgs: len(msgs) >= expect)

    def polled() -> list:
        if not done(got):
            got.extend(consumer.poll(100, 0.2))
        return got

    try:
        wait_for(polled, f"the messages expected on {topic} ({expect} or as done() says)",
                 until=done, timeout=timeout, every=0)
    finally:
        consumer.close()
    return got


def run_until(w: IngestWorker, handled: int, timeout: float = 15.0) -> None:
    """Step ``w`` (in this thread) until it handled ``handled`` messages."""

    def stepped() -> int:
        if w.handled < handled:
            w.step()
        return w.handled

    wait_for(stepped, f"the worker to handle {handled} messages (handled)",
             until=lambda n: n >= handled, timeout=timeout, every=0, retry_on=())


def profile(shards: ShardSet, uid: int) -> dict:
    return shards.for_user(uid).get_profile(uid) or {}


def test_bad_messages_go_to_the_dlq_and_the_rest_proceeds(bus: Bus, shards: ShardSet) -> None:
    # Given good events, a poison message and an event that breaks on the stored profile
    good = [
        {"event_id": f"g{i}", "user_id": 100 + i % 5, "inc": {"orders.total": 1}} for i in range(20)
    ]
    publish(bus, [*good[:10], b"\xff\xfe not json",
                  {"event_id": "x", "user_id": 100, "inc": {"orders.total.deep": 1}}, *good[10:]])

    # When the worker consumes everything
    w = worker(bus, shards)
    try:
        run_until(w, 22)
    finally:
        w.close()

    # Then every good event applied exactly once per user...
    for uid in range(100, 105):
        assert profile(shards, uid) == {"orders": {"total": 4}}
    # ...the two bad messages are dead-lettered with their cause and original bytes...
    dlq = [orjson.loads(m.value) for m in drain(bus, bus.topic("events.dlq"), 2)]
    assert len(dlq) == 2
    by_cause = {("JSON" in d["cause"]): d for d in dlq}
    assert by_cause[True]["encoding"] == "base64"
    assert "not an object" in by_cause[False]["cause"] and by_cause[False]["event_id"] == "x"
    assert all(d["source"]["topic"] == bus.topic("events") for d in dlq)
    # ...and a re-evaluation was requested for each changed user, per shard
    def users_in(msgs: list) -> list[int]:
        return sorted({u for m in msgs for u in orjson.loads(m.value)["user_ids"]})

    msgs = drain(bus, bus.topic("jobs"), 0, done=lambda got: users_in(got) == list(range(100, 105)))
    jobs = [orjson.loads(m.value) for m in msgs]
    assert sorted({u for j in jobs for u in j["user_ids"]}) == list(range(100, 105))
    assert all(shards.router.shard_of(u) == j["shard"] for j in jobs for u in j["user_ids"])


def test_pipelined_small_batches_equal_one_by_one(bus: Bus, shards: ShardSet) -> None:
    # Given 400 events over 23 users, client retries (same id, later offset) and junk
    events = []
    for i in range(400):
        uid = 1000 + (i * 7) % 23
        ops = [{"inc": {"n": 1}}, {"append": {"log": {"value": i, "cap": 5}}},
               {"set": {"s": {"k": i}}}, {"max": {"m": i % 17}}, {"set": {"n": "x"}}][i % 5]
        events.append({"event_id": f"e{i}", "user_id": uid} | ops)
    retried = [events[i] for i in range(0, 400, 37)]
    junk = [b"{}", b"[]", b'{"event_id": "j", "user_id": 1, "inc": {"a": "b"}}']
    publish(bus, events[:200] + junk + events[200:] + retried)

    # When a worker with 3 batches in flight reads it 17 messages at a time
    w = worker(bus, shards, batch_max=17, pipeline=3)
    try:
        run_until(w, len(events) + len(junk) + len(retried), timeout=30)
    finally:
        w.close()

    # Then each profile is the one-by-one result, and the DLQ holds the junk and
    # exactly the events the one-by-one application refuses (inc of n after n = "x")
    refused: list = []
    for uid in range(1000, 1023):
        mine = [parse_event(e) for e in events + retried if e["user_id"] == uid]
        assert profile(shards, uid) == oracle(mine, rejected=refused), uid
    assert refused and w.dead_lettered == len(junk) + len(refused)
    dlq = [orjson.loads(m.value) for m in drain(bus, bus.topic("events.dlq"), w.dead_lettered)]
    assert sorted(d["event_id"] for d in dlq if d["event_id"]) == sorted(
        e.event_id for e in refused
    )
    assert len(dlq) == w.dead_lettered


def test_only_changed_users_are_reevaluated_once_per_batch(
    memory_bus: MemoryBus, shards: ShardSet
) -> None:
    bus = memory_bus
    w = worker(bus, shards)
    try:
        # Given two users with a stored value
        publish(bus, [{"event_id": "a0", "user_id": 1, "set": {"m": 10}},
                      {"event_id": "b0", "user_id": 2, "set": {"m": 10}}])
        run_until(w, 2)
        before = len(bus.messages(bus.topic("jobs")))
        # When a batch changes user 1 three times and user 2 not at all (max of a
        # smaller value, a duplicate id)
        publish(bus, [{"event_id": "a1", "user_id": 1, "inc": {"n": 1}},
                      {"event_id": "b1", "user_id": 2, "max": {"m": 3}},
                      {"event_id": "a2", "user_id": 1, "inc": {"n": 1}},
                      {"event_id": "b0", "user_id": 2, "set": {"m": 99}},
                      {"event_id": "a3", "user_id": 1, "inc": {"n": 1}}])
        run_until(w, 7)
    finally:
        w.close()
    # Then one request names user 1, once, and nobody asks about user 2
    jobs = [orjson.loads(m.value) for m in bus.messages(bus.topic("jobs"))[before:]]
    assert [u for j in jobs for u in j["user_ids"]] == [1]
    assert profile(shards, 1) == {"m": 10, "n": 3} and profile(shards, 2) == {"m": 10}


@pytest.mark.postgres
def test_offsets_are_committed_only_after_every_shard_committed(
    memory_bus: MemoryBus, pg_shards: tuple[ShardSet, list[str]]
) -> None:
    bus = memory_bus
    shards, urls = pg_shards
    users = list(range(1, 41))
    by_shard = shards.router.split(users)
    assert set(by_shard) == {0, 1}
    publish(bus, [{"event_id": f"e{u}", "user_id": u, "inc": {"n": u}} for u in users])
    group = f"{bus.prefix}-ingest"
    w = worker(bus, shards)
    try:
        # Given shard 1 is down
        pgcontrol.down(urls[1])
        # When the worker tries the batch
        with pytest.raises(Exception, match="shard 1"):
            w.step()
            w.step()
        # Then shard 0 committed its part, but no offset is committed
        assert all(profile(shards, u) == {"n": u} for u in by_shard[0])
        assert bus.pending(bus.topic("events"), group) == len(users)
        # When shard 1 is back and the batch is retried
        pgcontrol.up(urls[1])
        run_until(w, len(users))
    finally:
        w.close()
    # Then everything applied exactly once (shard 0 skipped its part by its marks)
    assert all(profile(shards, u) == {"n": u} for u in users)
    assert bus.pending(bus.topic("events"), group) == 0


@pytest.mark.postgres
def test_a_message_its_shard_refuses_is_dead_lettered_alone(
    memory_bus: MemoryBus, pg_shards: tuple[ShardSet, list[str]]
) -> None:
    bus = memory_bus
    shards, urls = pg_shards
    # Given shard databases that refuse profiles with a "poison" key (a constraint
    # the validation does not know about)
    for url in urls:
        pgcontrol.execute(
            url, "ALTER TABLE profiles ADD CONSTRAINT no_poison CHECK (NOT (doc::jsonb ? 'poison'))"
        )
    events = [{"event_id": f"e{i}", "user_id": 1 + i % 9, "inc": {"n": 1}} for i in range(60)]
    events[33] = {"event_id": "bad", "user_id": 5, "set": {"poison": True}}
    publish(bus, events)
    # When the worker runs through it (the first attempt fails, then it bisects)
    w = worker(bus, shards)
    try:

        def stepped() -> int:
            if w.handled < len(events):
                w.step()  # raises on the failed attempt: retried, as the run loop would
            return w.handled

        wait_for(stepped, f"the worker to handle all {len(events)} events (handled)",
                 until=lambda n: n >= len(events), timeout=20, every=0)
    finally:
        w.close()
    # Then only that message is dead-lettered, and everything else applied once
    [dead] = [orjson.loads(m.value) for m in bus.messages(bus.topic("events.dlq"))]
    assert (
        "refused by the shard" in dead["cause"]
        and orjson.loads(dead["original"])["event_id"] == "bad"
    )
    for uid in range(1, 10):
        n = sum(1 for e in events if e["user_id"] == uid and "inc" in e)
        assert profile(shards, uid) == {"n": n}
