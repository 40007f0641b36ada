"""The shard store contract, run over SQLite (embedded) and PostgreSQL (production)."""

from __future__ import annotations

from datetime import date
from functools import partial
from pathlib import Path

import pytest

from engine.ingest.events import apply_events
from engine.messages.event import Event
from shards.backends.sqlite import SqliteShardStore
from shards.copytext import parse_rows
from shards.migrations import runner
from shards.router import MAX_USER_ID
from shards.shardset import open_shard
from shards.store import BannerChange, IngestItem, ShardStore, StateWrite

APPLY = partial(apply_events, max_bytes=64 * 1024)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ShardStore:
    if request.param == "sqlite":
        s: ShardStore = SqliteShardStore.from_url(0, f"sqlite:///{tmp_path / 's.db'}")
        runner.upgrade("shard", s.engine)  # type: ignore[attr-defined]
    else:
        dbs = request.getfixturevalue("pg_factory")(1)
        s = open_shard(0, dbs.shards[0])
    yield s
    s.close()


def ev(eid: str, uid: int, **ops: object) -> Event:
    return Event.model_validate({"event_id": eid, "user_id": uid} | ops)


def item(e: Event, offset: int = -1, partition: int = 0) -> IngestItem:
    return IngestItem(e.user_id, e, "events", partition, offset)


def test_ingest_applies_in_order_and_reports_changed_users(store: ShardStore) -> None:
    out = store.ingest([item(ev("1", 5, set={"a": 1}), 0), item(ev("2", 5, inc={"a": 2}), 1),
                        item(ev("3", 6, set={"b": True}), 2)], APPLY)
    assert sorted(out.changed) == [5, 6] and out.applied == 3
    assert store.get_profile(5) == {"a": 3}
    assert store.get_profile(6) == {"b": True}


def test_replayed_offsets_are_skipped(store: ShardStore) -> None:
    # Given a batch committed to the shard
    batch = [item(ev("1", 5, inc={"n": 1}), 10), item(ev("2", 5, inc={"n": 1}), 11)]
    store.ingest(batch, APPLY)
    # When the same offsets arrive again (a crash before the Kafka commit), plus one new
    out = store.ingest([*batch, item(ev("3", 5, inc={"n": 1}), 12)], APPLY)
    # Then only the new one applies
    assert out.skipped == 2 and out.applied == 1
    assert store.get_profile(5) == {"n": 3}


def test_retried_event_ids_apply_once(store: ShardStore) -> None:
    store.ingest([item(ev("same", 9, inc={"n": 1}))], APPLY)
    out = store.ingest([item(ev("same", 9, inc={"n": 1}))], APPLY)
    assert out.applied == 0 and store.get_profile(9) == {"n": 1}


def test_stream_range_and_users(store: ShardStore) -> None:
    store.put_profiles([(u, {"u": u}) for u in range(1, 101)])
    store.save_state([(3, {"r": [1, 1, 1, "2026-01-01"]})])
    got = {r.user_id: r for chunk in store.stream_range(2, 50, batch=7) for r in chunk}
    assert sorted(got) == list(range(2, 51))
    assert got[3].state == {"r": [1, 1, 1, "2026-01-01"]} and got[2].state == {}
    assert sorted(r.user_id for c in store.stream_users([50, 3, 999]) for r in c) == [3, 50]


def test_scan_range_yields_each_user_once_in_bounded_chunks(store: ShardStore) -> None:
    # Given profiles written in descending id order (storage order is not id order),
    # one of them with an evaluation state
    store.put_profiles([(u, {"u": u}) for u in range(120, 0, -1)])
    store.save_state([(40, {"r": [2, 1, 3, "2026-01-01"]})])
    # When a range is scanned in chunks of 7
    chunks = list(store.scan_range(10, 60, batch=7))
    # Then every user of the range comes once, unpacking as (user_id, doc, state)
    rows = {uid: (doc, state) for chunk in chunks for uid, doc, state in chunk}
    assert sorted(rows) == list(range(10, 61))
    assert sum(len(c) for c in chunks) == 51
    assert all(1 <= len(c) <= 7 for c in chunks)
    assert rows[40] == ({"u": 40}, {"r": [2, 1, 3, "2026-01-01"]})
    assert rows[41] == ({"u": 41}, None)  # never evaluated
    assert list(store.scan_range(200, 300)) == []


def test_scans_read_documents_with_escapes_and_hand_written_whitespace(store: ShardStore) -> None:
    # Given a document with backslashes, quotes, tabs and newlines in its strings,
    # and (PostgreSQL keeps json text as written) one stored by hand, pretty-printed
    tricky = {"name": 'O"Brien \\ \\n', "note": "a\tb\nc\\t", "list": ["\\", "x\r"]}
    store.put_profiles([(1, tricky)])
    pretty = '{\n\t"name": "Ann\\\\n",\r\n  "n": [1,\t2]\n}'
    engine = getattr(store, "engine", None)
    if engine is not None and engine.dialect.name == "postgresql":
        from sqlalchemy import text

        with engine.begin() as conn:
            conn.execute(text("INSERT INTO profiles (user_id, doc, seen, version, updated_at) "
                              "VALUES (2, CAST(:d AS json), '[]', 1, now())"), {"d": pretty})
        want_pretty = {"name": "Ann\\n", "n": [1, 2]}
    else:
        store.put_profiles([(2, {"name": "Ann\\n", "n": [1, 2]})])
        want_pretty = {"name": "Ann\\n", "n": [1, 2]}
    # When they are scanned / Then they read back exactly
    rows = {uid: doc for chunk in store.scan_range(1, 2) for uid, doc, _ in chunk}
    assert rows == {1: tricky, 2: want_pretty}
    # and so do the COPY text lines the evaluator hands its sandbox child
    text_rows = {uid: doc for chunk in store.scan_range_text(1, 2)
                 for uid, doc, _ in parse_rows(chunk)}
    assert text_rows == {1: tricky, 2: want_pretty}


def test_text_scans_carry_the_same_rows_and_states(store: ShardStore) -> None:
    store.put_profiles([(u, {"u": u, "s": "t\tab"}) for u in range(1, 21)])
    store.save_state([(5, {"r": [1, 1, 1, "2026-01-01"]})])
    plain = sorted((u, d, s) for c in store.scan_range(1, 20) for u, d, s in c)
    text = sorted(r for c in store.scan_range_text(1, 20, batch=6) for r in parse_rows(c))
    assert text == plain and len(text) == 20
    chunks = list(store.scan_users_text([5, 7, 404], batch=1))
    assert [parse_rows(c) for c in chunks] == [[(5, {"u": 5, "s": "t\tab"},
                                                 {"r": [1, 1, 1, "2026-01-01"]})],
                                                [(7, {"u": 7, "s": "t\tab"}, None)]]


def test_scan_users_skips_unknown_and_repeated_ids(store: ShardStore) -> None:
    store.put_profiles([(u, {"u": u}) for u in range(1, 31)])
    store.save_state([(5, {"r": [1, 1, 1, "2026-01-01"]})])
    wanted = [25, 5, 999, 5, *range(10, 20)]
    chunks = list(store.scan_users(wanted, batch=4))
    rows = {uid: (doc, state) for chunk in chunks for uid, doc, state in chunk}
    assert sorted(rows) == [5, *range(10, 20), 25]
    assert sum(len(c) for c in chunks) == 12 and all(1 <= len(c) <= 4 for c in chunks)
    assert rows[5] == ({"u": 5}, {"r": [1, 1, 1, "2026-01-01"]}) and rows[25][1] is None
    assert list(store.scan_users([])) == [] and list(store.scan_users([404])) == []


def test_scans_are_part_of_the_interface() -> None:
    # The evaluator, ingest and the API call these on any ShardStore; a backend must
    # implement them (no probing with getattr for optional methods).
    assert {"scan_range", "scan_users", "set_ingest_cache", "add_banner_listener",
            "remove_banner_listener", "estimate_count"} <= ShardStore.__abstractmethods__


def test_banner_listeners_hear_committed_changes_until_removed(store: ShardStore) -> None:
    heard: list[list[tuple[int, int]]] = []
    store.add_banner_listener(heard.append)
    store.apply_banner_changes([BannerChange(7, "r", 1, 1, 10, date(2026, 11, 24),
                                             {"title": "t", "body": "b", "link": "/x"})])
    store.remove_banner_listener(heard.append)
    store.apply_banner_changes([BannerChange(7, "r", 1, 1, 10, date(2026, 11, 24), None)])
    assert [[u for u, _ in batch] for batch in heard] == [[7]]
    store.set_ingest_cache(100)  # part of the interface on every backend


def test_plan_ranges_cover_everyone_once(store: ShardStore) -> None:
    store.put_profiles([(u * 7, {}) for u in range(1, 1001)])
    ranges = store.plan_ranges(target_users=100)
    assert ranges[0][0] == 1 and ranges[-1][1] == MAX_USER_ID
    seen = [r.user_id for lo, hi in ranges for c in store.stream_range(lo, hi) for r in c]
    assert sorted(seen) == [u * 7 for u in range(1, 1001)] and len(seen) == len(set(seen))
    assert 5 <= len(ranges) <= 20


def _banner(uid: int, rule: str, ep: int, title: str | None, prio: int = 10) -> BannerChange:
    content = None if title is None else {"title": title, "body": "b", "link": "/x"}
    return BannerChange(uid, rule, ep, 1, prio, date(2026, 11, 24), content)


def test_banners_level_triggered_with_versions(store: ShardStore) -> None:
    assert store.banners(1) == (0, [])
    assert store.apply_banner_changes(
        [_banner(1, "a", 1, "A", 5), _banner(1, "b", 1, "B", 50)]
    ) == [1]
    v1, items = store.banners(1)
    assert [b["rule"] for b in items] == ["b", "a"] and v1 >= 1
    # A redelivered identical change changes nothing, not even the version
    assert store.apply_banner_changes([_banner(1, "b", 1, "B", 50)]) == []
    assert store.banner_version(1) == v1
    # Exit removes; a stale exit of an older episode does not remove a newer one
    store.apply_banner_changes([_banner(1, "a", 1, None)])
    store.apply_banner_changes([_banner(1, "b", 2, "B2", 50), _banner(1, "b", 1, None)])
    v2, items = store.banners(1)
    assert [(b["rule"], b["title"]) for b in items] == [("b", "B2")] and v2 > v1


def test_dismiss_hides_for_the_episode(store: ShardStore) -> None:
    store.apply_banner_changes([_banner(2, "a", 1, "A")])
    bid = store.banners(2)[1][0]["id"]
    assert store.dismiss(2, bid) is True
    assert store.banners(2)[1] == []
    store.apply_banner_changes([_banner(2, "a", 1, "A")])  # same episode again: still hidden
    assert store.banners(2)[1] == []
    store.apply_banner_changes([_banner(2, "a", 1, None), _banner(2, "a", 2, "A")])  # new episode
    assert [b["id"] for b in store.banners(2)[1]] == ["a.2"]
    assert store.dismiss(2, "nope.1") is False


# -- the wake-up index -----------------------------------------------------------
D = date(2026, 12, 1)


def _due(store: ShardStore, on: date, text: bool = False) -> list[int]:
    if text:
        return sorted(u for c in store.scan_range_text(1, 100, 4, due_on=on)
                      for u, _, _ in parse_rows(c))
    return sorted(u for c in store.scan_range(1, 100, 4, due_on=on) for u, _, _ in c)


def test_a_range_scan_for_a_date_reads_only_the_users_due(store: ShardStore) -> None:
    # Given users never evaluated (1), stored without a date (2), computed for D with
    # horizons before, on and after D+1, with none (never by time), and for a later date
    store.put_profiles([(u, {"u": u}) for u in range(1, 9)])
    st = {"r": [1, 1, 1, "2026-11-30"]}
    store.save_state([
        (2, st),
        StateWrite(3, st, D, date(2026, 12, 1)),
        StateWrite(4, st, D, date(2026, 12, 2)),
        StateWrite(5, st, D, date(2026, 12, 3)),
        StateWrite(6, st, D, None),
        StateWrite(7, st, date(2026, 12, 5), date(2027, 1, 1)),
        StateWrite(8, st, D, date(2026, 11, 1)),
    ])
    # When the night of D+1 scans the range (rows and COPY text alike)
    for text in (False, True):
        # Then it reads the never-evaluated, the undated, the horizons on or before
        # D+1, and the state computed for a later date (a replay evaluates it again)
        assert _due(store, date(2026, 12, 2), text) == [1, 2, 3, 4, 7, 8]
    # and a scan without a date reads everyone; the count agrees with the scan
    assert sorted(u for c in store.scan_range(1, 100) for u, _, _ in c) == list(range(1, 9))
    assert store.count_due(date(2026, 12, 2)) == 6
    assert store.count_due(date(2027, 6, 1)) == 7  # 6 sleeps until its profile changes


def test_a_restricted_run_keeps_the_earlier_horizon(store: ShardStore) -> None:
    store.put_profiles([(u, {"u": u}) for u in range(1, 5)])
    st = {"r": [1, 1, 1, "2026-11-30"]}
    store.save_state([StateWrite(1, st, D, date(2026, 12, 10)),
                      StateWrite(2, st, D, date(2026, 12, 10)),
                      StateWrite(3, st, D, None)])
    # When a run of some rules only stores new horizons with merge_wake
    store.save_state([StateWrite(1, st, D, date(2026, 12, 4)),
                      StateWrite(2, st, D, date(2026, 12, 20)),
                      StateWrite(3, st, D, date(2026, 12, 6)),
                      StateWrite(4, st, D, date(2026, 12, 8))], merge_wake=True)
    # Then each user keeps the earliest of the two (None: never), and user 4, who had
    # no state, stays due for a full evaluation
    assert _due(store, date(2026, 12, 5)) == [1, 4]
    assert _due(store, date(2026, 12, 7)) == [1, 3, 4]
    assert _due(store, date(2026, 12, 10)) == [1, 2, 3, 4]
    # and a full write replaces it
    store.save_state([StateWrite(1, st, D, None), StateWrite(4, st, D, date(2026, 12, 8))])
    assert _due(store, date(2026, 12, 7)) == [3]
    assert _due(store, date(2026, 12, 10)) == [2, 3, 4]


def test_unchanged_matches_are_left_as_stored_and_only_the_dates_move(
        store: ShardStore) -> None:
    # Given a user whose matches were just written by another evaluation (after ingest)
    store.put_profiles([(1, {"u": 1}), (2, {"u": 2})])
    fresh = {"r": [2, 1, 1, "2026-12-01"]}
    store.save_state([StateWrite(1, fresh, D, date(2026, 12, 3))])
    # When a night that read the user before that write finds its matches unchanged
    store.save_state([StateWrite(1, None, D, date(2026, 12, 9)),
                      StateWrite(2, None, D, None)])
    # Then the matches stay as stored (and a user with none gets {}); the dates move
    rows = {u: s for c in store.scan_range(1, 2) for u, _, s in c}
    assert rows == {1: fresh, 2: {}}
    assert _due(store, date(2026, 12, 8)) == []
    assert _due(store, date(2026, 12, 9)) == [1]


def test_a_restricted_run_writes_only_its_rules_entries(store: ShardStore) -> None:
    # Given a user's matches for two rules
    store.put_profiles([(1, {"u": 1}), (2, {"u": 2})])
    store.save_state([StateWrite(1, {"a": [1, 1, 1, "2026-11-30"], "b": [3, 0, 2, "2026-11-01"]},
                                 D, None)])
    # When runs restricted to rule b (and to a new rule c) write their entries
    store.save_state([StateWrite(1, {"b": [4, 1, 2, "2026-12-01"]}, D, None),
                      StateWrite(2, {"c": [1, 1, 1, "2026-12-01"]}, D, None)], merge_wake=True)
    # Then the other rules' entries stay
    rows = {u: s for c in store.scan_range(1, 2) for u, _, s in c}
    assert rows == {1: {"a": [1, 1, 1, "2026-11-30"], "b": [4, 1, 2, "2026-12-01"]},
                    2: {"c": [1, 1, 1, "2026-12-01"]}}
