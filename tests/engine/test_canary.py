"""Canary rollout in the evaluator: each user gets the version its bucket picks."""

from __future__ import annotations

from datetime import date

import orjson

from base.buckets import bucket, in_share, rollout_salt
from catalogue.service import canary_mark, check_rollout
from engine.evaluate.evaluation import CompiledPack, RangeStats, evaluate_rows
from engine.messages import encode
from rules.context import make_context
from rules.ruleset import ActiveRule

AS_OF = date(2026, 11, 24)
CTX = make_context(AS_OF)


def version(v: int, expr: str, title: str) -> ActiveRule:
    return ActiveRule(key="r", version=v, name="r", group=None, priority=100,
                      source=f"def match(profile, ctx):\n    return {expr}\n",
                      banner={"title": title, "body": "", "link": ""}, email=None)


OLD = version(1, "profile.get('x', 0) >= 5", "old")
NEW = version(2, "profile.get('x', 0) >= 3", "new")


def canary(percent: int) -> ActiveRule:
    return ActiveRule(**{f: getattr(NEW, f) for f in ("key", "version", "name", "group",
                                                      "priority", "source", "banner",
                                                      "email")},
                      rollout=percent, salt="r", base=OLD)


def in_canary(uid: int, percent: int) -> bool:
    return in_share(bucket(rollout_salt("r"), uid), percent)


def evaluate(rule: ActiveRule, rows: list[tuple[int, dict, dict | None]]) -> list[dict]:
    results, _ = evaluate_rows(rows, CompiledPack([rule], 50), CTX, 1, RangeStats())
    return [orjson.loads(encode(r)) for r in results]


def test_share_is_close_to_percent_and_stable() -> None:
    ids = range(100_000)
    for pct in (1, 10, 25, 50):
        n = sum(in_canary(u, pct) for u in ids)
        # binomial sd at 100k is under 160 users: 5 sd either side
        assert abs(n - pct * 1000) < 800, (pct, n)
    # a user in the canary at 10 % stays in it when it grows to 50 % (nested shares)
    assert all(in_canary(u, 50) for u in range(20_000) if in_canary(u, 10))
    # independent of the holdout's assignment (same salt without "/rollout")
    both = sum(in_canary(u, 50) and in_share(bucket("r", u), 50) for u in ids)
    assert abs(both - 25_000) < 1_000


def test_each_user_gets_the_version_its_bucket_picks() -> None:
    # users with x = 4: only the new version matches them
    rows = [(u, {"x": 4}, None) for u in range(2_000)]
    got = evaluate(canary(20), rows)
    expected = {u for u in range(2_000) if in_canary(u, 20)}
    assert {r["user_id"] for r in got} == expected
    assert {r["version"] for r in got} == {2}
    assert {r["banner"]["title"] for r in got} == {"new"}
    # x = 6 matches both: everyone enters, with the version (and content) they are on
    got = evaluate(canary(20), [(u, {"x": 6}, None) for u in range(2_000)])
    assert len(got) == 2_000
    for r in got:
        v = 2 if in_canary(r["user_id"], 20) else 1
        assert (r["version"], r["banner"]["title"]) == (v, "new" if v == 2 else "old")


def test_rollout_change_moves_exactly_the_users_whose_answer_differs() -> None:
    # state as evaluated under a 10 % canary; then the canary grows to 40 %
    rows = [(u, {"x": 3 + u % 4}, None) for u in range(4_000)]
    states = {}
    for uid, state, _ in evaluate_rows(rows, CompiledPack([canary(10)], 50), CTX, 1,
                                        RangeStats())[1]:
        states[uid] = state
    again = [(u, doc, states[u]) for u, doc, _ in rows]
    got = evaluate(canary(40), again)
    # x = 3 or 4: the new version matches, the old does not; moved users (in 40 % not in
    # 10 %) enter; nobody else changes
    moved = {u for u, doc, _ in rows if in_canary(u, 40) and not in_canary(u, 10)
             and doc["x"] < 5}
    assert {(r["user_id"], r["kind"]) for r in got} == {(u, "enter") for u in moved}


def test_failing_base_version_counts_for_its_users_only() -> None:
    broken = version(1, "profile['missing'] > 0", "old")
    rule = ActiveRule(**{**{f: getattr(canary(50), f) for f in (
        "key", "version", "name", "group", "priority", "source", "banner", "email",
        "rollout", "salt")}, "base": broken})
    stats = RangeStats()
    evaluate_rows([(u, {"x": 1}, None) for u in range(1_000)], CompiledPack([rule], 50), CTX,
                  1, stats)
    assert stats.errors["r"] == sum(not in_canary(u, 50) for u in range(1_000))
    assert set(stats.errors) == {"r"}


def test_rollout_values_and_marks() -> None:
    assert check_rollout(10) == 10 and check_rollout(100.0) == 100
    for bad in (0, 101, 2.5, True, "10", None):
        try:
            check_rollout(bad)
        except ValueError:
            continue
        raise AssertionError(bad)
    marks = {canary_mark(v, b, p) for v in (2, 3) for b in (1, 2) for p in (1, 50, 99)}
    assert len(marks) == 12 and all(m < 0 for m in marks)


def test_a_campaign_of_the_rule_picks_per_user_too() -> None:
    other = ActiveRule(key="o", version=1, name="o", group=None, priority=100,
                       source="def match(profile, ctx):\n    return True\n",
                       banner={"title": "o", "body": "", "link": ""}, email=None)
    pack = CompiledPack([canary(20), other], 50, only=["r"])
    results, _ = evaluate_rows([(u, {"x": 4}, None) for u in range(1_000)], pack, CTX, 1,
                               RangeStats())
    assert {(r.user_id, r.rule, r.version) for r in results} == {
        (u, "r", 2) for u in range(1_000) if in_canary(u, 20)}


def test_wake_date_is_the_earlier_horizon_of_both_versions() -> None:
    def dated(v: int, days: int) -> ActiveRule:
        return ActiveRule(key="r", version=v, name="r", group=None, priority=100,
                          source="def match(profile, ctx):\n    d = days_until("
                                 f"get(profile, 'd'), ctx)\n    return d is not None and "
                                 f"d <= {days}\n",
                          banner=None, email=None)
    base, new = dated(1, 5), dated(2, 10)
    rule = ActiveRule("r", 2, "r", None, 100, new.source, None, None, rollout=50, salt="r",
                      base=base)
    doc = {"d": "2026-12-14"}  # 20 days ahead: v1 flips in 15 days, v2 in 10
    _, states = evaluate_rows([(u, doc, None) for u in range(200)], CompiledPack([rule], 50),
                              CTX, 1, RangeStats())
    assert {w for _, _, w in states} == {"2026-12-04"}  # AS_OF + 10: nobody sleeps past it
    # without the canary, v1's users would sleep until its own flip
    _, alone = evaluate_rows([(0, doc, None)], CompiledPack([base], 50), CTX, 1, RangeStats())
    assert alone[0][2] == "2026-12-09"
