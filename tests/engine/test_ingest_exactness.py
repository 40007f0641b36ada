"""Exactly-once effect through the real shard stores (SQLite and PostgreSQL).

A simulated Kafka consumer feeds ``ShardStore.ingest`` with random batch cuts,
random interleavings of partitions, "crashes" that redeliver everything after the
last committed offset (some of it already written to the shard), and client
retries that send an event again at a new offset. Every user's stored profile
must equal applying that user's events one by one (each id once).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from functools import partial

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from base.errors import StorageError
from engine.ingest.events import apply_user
from engine.messages.event import parse_event
from shards.backends.sqlite import SqliteShardStore
from shards.migrations import runner
from shards.shardset import open_shard
from shards.store import IngestItem, ShardStore
from tests.engine.test_events import oracle

APPLY = partial(apply_user, max_bytes=400, seen_cap=1000)  # small limit: some events fail on size
_example = itertools.count(1)


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ShardStore]:
    if request.param == "sqlite":
        s: ShardStore = SqliteShardStore.from_url(
            0, f"sqlite:///{tmp_path_factory.mktemp('x') / 's.db'}"
        )
        runner.upgrade("shard", s.engine)  # type: ignore[attr-defined]
    else:
        s = open_shard(0, request.getfixturevalue("pg_factory_module")(1).shards[0])
        s.set_ingest_cache(50)  # type: ignore[attr-defined]  # small: entries get evicted too
    yield s
    s.close()


@pytest.fixture(scope="module")
def pg_factory_module(pg_templates: dict[str, str]) -> Iterator:
    """pg_factory, once per module (hypothesis examples share one database)."""
    from tests.fixtures import postgres

    gen = postgres.pg_factory.__wrapped__(pg_templates)  # type: ignore[attr-defined]
    make = next(gen)
    yield make
    next(gen, None)


keys = st.sampled_from(["a", "b", "c"])
paths = st.lists(keys, min_size=1, max_size=2).map(".".join)
scalars = st.one_of(st.integers(-100, 100), st.sampled_from(["x", "yy", "2026-01-01"]), st.none())
values = st.recursive(scalars, lambda c: st.dictionaries(keys, c, max_size=2), max_leaves=4)
ops = st.fixed_dictionaries(
    {},
    optional={
        "set": st.dictionaries(st.one_of(keys, paths), values, min_size=1, max_size=2),
        "unset": st.lists(paths, min_size=1, max_size=1),
        "inc": st.dictionaries(paths, st.integers(-3, 3), min_size=1, max_size=2),
        "append": st.dictionaries(
            paths,
            st.fixed_dictionaries(
                {
                    "value": st.text(
                        st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                        max_size=40,
                    ),
                    "cap": st.integers(1, 4),
                }
            ),
            min_size=1,
            max_size=1,
        ),
        "max": st.dictionaries(paths, st.integers(-9, 9), min_size=1, max_size=1),
    },
).filter(bool)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(st.tuples(st.integers(0, 3), ops), min_size=1, max_size=30), st.data())
def test_random_cuts_crashes_and_retries_apply_each_event_once(
    store: ShardStore, spec: list[tuple[int, dict]], data: st.DataObject
) -> None:
    n = next(_example)
    base = n * 100  # fresh users and topic for every example
    topic = f"events-{n}"
    # Given events for 4 users over 2 partitions (key = user), some sent twice
    events = [
        parse_event({"event_id": f"e{i}", "user_id": base + u} | o) for i, (u, o) in enumerate(spec)
    ]
    retries = data.draw(st.lists(st.integers(0, len(events) - 1), max_size=5))
    sent = events + [events[i] for i in retries]
    logs: dict[int, list] = {0: [], 1: []}
    for e in sent:
        logs[e.user_id % 2].append(e)

    # When a consumer works through it with random cuts, commits and crashes
    committed = {0: 0, 1: 0}
    position = dict(committed)
    while any(committed[p] < len(logs[p]) for p in logs):
        items = []
        for _ in range(data.draw(st.integers(1, 6))):
            p = data.draw(st.sampled_from([p for p in logs if position[p] < len(logs[p])] or [0]))
            if position[p] < len(logs[p]):
                off = position[p]
                items.append(IngestItem(logs[p][off].user_id, logs[p][off], topic, p, off))
                position[p] += 1
        store.ingest(items, APPLY)
        action = data.draw(st.sampled_from(["commit", "commit", "crash", "next"]))
        if (
            action == "commit"
            or all(position[p] == len(logs[p]) for p in logs)
            and action != "crash"
        ):
            committed = dict(position)
        elif action == "crash":
            position = dict(committed)  # redelivery from the last commit

    # Then every profile is the one-by-one result
    for uid in {e.user_id for e in events}:
        expected = oracle([e for e in logs[uid % 2] if e.user_id == uid], max_bytes=400)
        got = store.get_profile(uid) or {}
        assert orjson.dumps(got, option=orjson.OPT_SORT_KEYS) == orjson.dumps(
            expected, option=orjson.OPT_SORT_KEYS
        ), uid


@pytest.mark.postgres
def test_a_profile_changed_behind_the_cache_fails_the_write_and_the_retry_is_exact(
    pg_factory,
) -> None:  # noqa: ANN001
    store = open_shard(0, pg_factory(1).shards[0])
    store.set_ingest_cache(100)  # type: ignore[attr-defined]
    try:

        def item(eid: str, off: int, **op: object) -> IngestItem:
            return IngestItem(5, parse_event({"event_id": eid, "user_id": 5} | op), "t", 0, off)

        # Given a profile the ingest cache holds
        store.ingest([item("1", 0, inc={"n": 1})], APPLY)
        # When someone else rewrites it (another writer: a bulk load, a stray worker)
        store.put_profiles([(5, {"n": 10})])
        # Then the next ingest write notices instead of overwriting it...
        batch = [item("2", 1, inc={"n": 1})]
        with pytest.raises(StorageError, match="changed by another writer"):
            store.ingest(batch, APPLY)
        # ...and the retry reads the profile again and applies the event once
        out = store.ingest(batch, APPLY)
        assert out.applied == 1 and store.get_profile(5) == {"n": 11}
    finally:
        store.close()
