"""Range planning from shard statistics, and jobs spread evenly over partitions."""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.buses.kafka import murmur2
from engine.buses.memory import MemoryBus
from kvadrupel.container import Container
from scheduler.placement import spread_keys
from scheduler.planner import plan, start_run
from shards.backends.pg_stream import bounds_from_histogram
from shards.backends.postgres import PostgresShardStore
from shards.backends.sql import ranges_from_bounds
from shards.router import MAX_USER_ID
from tests.fixtures.waiting import wait_for
from tests.scheduler.helpers import AS_OF, KINDS, load_users, make_settings


def _signed(x: int) -> int:
    return x - (1 << 32) if x >= 1 << 31 else x


def test_murmur2_matches_the_java_client() -> None:
    # Test vectors of Kafka's Utils.murmur2 (signed 32-bit).
    vectors = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536,
               b"a-little-bit-longer-string": -1486304829, b"abc": 479470107,
               b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971}
    assert {k: _signed(murmur2(k)) for k in vectors} == vectors


@settings(max_examples=200, deadline=None)
@given(hist=st.lists(st.integers(1, 10**15), min_size=2, max_size=120, unique=True).map(sorted),
       k=st.integers(1, 400))
def test_histogram_bounds_give_ranges_without_gap_or_overlap(hist: list[int], k: int) -> None:
    bounds = bounds_from_histogram(hist, k)
    assert bounds == sorted(set(bounds)) and all(b > 1 for b in bounds)
    assert len(bounds) <= k - 1
    ranges = ranges_from_bounds(bounds)
    assert ranges[0][0] == 1 and ranges[-1][1] == MAX_USER_ID
    assert all(a[1] + 1 == b[0] for a, b in zip(ranges, ranges[1:], strict=False))


@pytest.mark.postgres
def test_postgres_plans_equal_ranges_from_its_statistics(pg_factory) -> None:  # noqa: ANN001
    # Given a shard never analysed, with users whose ids are unevenly spread
    db = pg_factory(1).shards[0]
    store = PostgresShardStore.from_url(0, db)
    try:
        ids = list(range(1_000, 7_000)) + list(range(10**12, 10**12 + 6_000 * 97, 97))
        store.put_profiles([(u, {"n": u}) for u in ids])
        # When it plans ranges of ~2,000 users
        ranges = store.plan_ranges(2_000)
        # Then the statistics were gathered and the ranges hold ~2,000 users each
        sizes = [sum(len(rows) for rows in store.scan_range(lo, hi)) for lo, hi in ranges]
        assert sum(sizes) == len(ids) and len(ranges) == 6
        assert all(1_400 <= s <= 2_600 for s in sizes), sizes
        assert store.estimate_count() == pytest.approx(len(ids), rel=0.05)
    finally:
        store.close()


@pytest.mark.parametrize("kind", KINDS)
def test_ranges_are_interleaved_across_shards(kind: str, request: pytest.FixtureRequest,
                                              tmp_path: Path) -> None:
    c = Container(make_settings(kind, request, tmp_path))
    try:
        c.migrate()
        load_users(c, 3_000)
        planned = plan(c.shards, 500)
        assert [r.shard for r in planned[:4]] == [0, 1, 0, 1]
        assert sum(r.est_users for r in planned) == pytest.approx(3_000, rel=0.1)
        per_shard = Counter(r.shard for r in planned)
        assert set(per_shard) == {0, 1} and all(n >= 2 for n in per_shard.values())
    finally:
        c.close()


def test_spread_keys_fill_memory_partitions_evenly() -> None:
    bus = MemoryBus("t", partitions=4)
    bus.ensure_topics(bus.topics.values(), 5)
    topic = bus.topic("jobs")
    keys = spread_keys(bus, topic, [f"9:{i}" for i in range(23)])
    for k in keys:
        bus.publish(topic, b"x", key=k)
    got = Counter(m.partition for m in bus.messages(topic))
    assert sorted(got.values()) == [4, 4, 5, 5, 5]
    assert keys[0] == b"9:0" or keys[0].startswith(b"9:0~")


@pytest.mark.kafka
def test_spread_keys_match_the_kafka_partitioner(kafka_bus_factory) -> None:  # noqa: ANN001
    # Given a jobs topic with 6 partitions on the real broker
    bus = kafka_bus_factory()
    bus.ensure_topics(bus.topics.values(), 6)
    topic = bus.topic("jobs")
    keys = spread_keys(bus, topic, [f"{uuid.uuid4().hex[:6]}:{i}" for i in range(24)])
    # When the keys are published
    for i, k in enumerate(keys):
        bus.publish(topic, orjson.dumps(i), key=k)
    bus.flush()
    consumer = bus.consumer(f"{bus.prefix}-check", [topic])
    got: dict[int, int] = {}

    def polled() -> dict[int, int]:
        for m in consumer.poll(100, 0.2):
            got[orjson.loads(m.value)] = m.partition
        return got

    try:
        wait_for(polled, f"the {len(keys)} jobs (job: partition)",
                 until=lambda jobs: len(jobs) >= len(keys), timeout=20, every=0)
    finally:
        consumer.close()
    # Then the i-th job is on partition i mod 6: 4 on each
    assert got == {i: i % 6 for i in range(24)}


@pytest.mark.parametrize("kind", KINDS)
def test_start_run_publishes_one_job_per_range(kind: str, request: pytest.FixtureRequest,
                                               tmp_path: Path) -> None:
    c = Container(make_settings(kind, request, tmp_path))
    try:
        c.migrate()
        load_users(c, 2_000)
        run_id = start_run(c.shards, c.runs, c.bus, AS_OF, 400, rules=["birthday"])
        again = start_run(c.shards, c.runs, c.bus, AS_OF, 400, fire_key="k")
        assert start_run(c.shards, c.runs, c.bus, AS_OF, 400, fire_key="k") == again
        info = c.runs.get(run_id)
        assert info["rules"] == ["birthday"] and info["ranges"]["total"] >= 4
        consumer = c.bus.consumer(f"{c.bus.prefix}-check", [c.bus.topic("jobs")])
        jobs: list[dict] = []
        total = info["ranges"]["total"] + c.runs.get(again)["ranges"]["total"]

        def polled() -> list[dict]:
            jobs.extend(orjson.loads(m.value) for m in consumer.poll(100, 0.2))
            return jobs

        try:
            wait_for(polled, f"the {total} jobs of both runs",
                     until=lambda got: len(got) >= total, timeout=20, every=0)
        finally:
            consumer.close()
        mine = sorted((j for j in jobs if j["run_id"] == run_id), key=lambda j: j["range_no"])
        assert len(jobs) == total  # the repeated firing published nothing
        assert [j["range_no"] for j in mine] == list(range(info["ranges"]["total"]))
        assert all(j["as_of"] == AS_OF.isoformat() and j["rules"] == ["birthday"] for j in mine)
    finally:
        c.close()

