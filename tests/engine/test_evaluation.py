"""evaluate_rows: state diffs, groups, failures, restricted runs, quarantine freeze."""

from __future__ import annotations

from datetime import date

import orjson

from engine.evaluate.evaluation import CompiledPack, RangeStats, evaluate_rows
from engine.messages import encode
from rules.context import make_context
from rules.ruleset import ActiveRule
from shards.store import ProfileRow

AS_OF = date(2026, 11, 24)
CTX = make_context(AS_OF)


def rule(key: str, source_expr: str, priority: int = 100, group: str | None = None,
         email: bool = False) -> ActiveRule:
    src = f"def match(profile, ctx):\n    return {source_expr}\n"
    return ActiveRule(key=key, version=3, name=key, group=group, priority=priority, source=src,
                      banner={"title": key, "body": "", "link": ""},
                      email={"subject": key, "text": "hi", "html": None} if email else None)


RULES = [
    rule("a", "profile.get('a') == 1", email=True),
    rule("b", "profile.get('b') == 1"),
    rule("g-high", "profile.get('g', 0) >= 2", priority=200, group="g"),
    rule("g-low", "profile.get('g', 0) >= 1", priority=150, group="g"),
    rule("boom", "profile['missing'] == 1"),
]


def run(rows, pack=None, ctx=CTX):  # noqa: ANN001, ANN201
    stats = RangeStats()
    results, states = evaluate_rows(rows, pack or CompiledPack(RULES, 50), ctx, 7, stats)
    # Every evaluated user gets a state to save (its place in the wake-up index);
    # the tests below look at the states that changed.
    given = [(r.user_id, r.state) if isinstance(r, ProfileRow) else (r[0], r[2]) for r in rows]
    assert [u for u, _, _ in states] == [u for u, _ in given][:len(states)]
    before = {u: s or {} for u, s in given}
    changed = {u: s for u, s, _ in states if s is not None and s != before[u]}
    # the typed messages (engine/messages.py) as they go on the bus
    return [orjson.loads(encode(r)) for r in results], changed, stats


def kinds(results) -> list[tuple[int, str, str, int]]:  # noqa: ANN001
    return sorted((r["user_id"], r["kind"], r["rule"], r["episode"]) for r in results)


def test_new_match_enters_with_episode_one_and_state() -> None:
    # Given a user who matched nothing before
    results, states, stats = run([(1, {"a": 1, "email": "x@example.org"}, None)])
    # Then one enter with banner and e-mail, and the state records episode 1
    assert kinds(results) == [(1, "enter", "a", 1)]
    enter = results[0]
    assert enter["banner"]["title"] == "a" and enter["email"]["to"] == "x@example.org"
    assert enter["run_id"] == 7 and enter["version"] == 3 and enter["as_of"] == "2026-11-24"
    assert states == {1: {"a": [1, 1, 3, "2026-11-24"]}}
    assert stats.users == 1 and stats.matches == {"a": 1} and stats.enters == 1
    # "boom" raised on the profile: counted, no match
    assert stats.errors == {"boom": 1} and "KeyError" in stats.error_samples["boom"]


def test_unchanged_users_emit_and_write_nothing() -> None:
    prev = {"a": [1, 1, 3, "2026-11-01"]}
    results, states, stats = run([(1, {"a": 1}, prev), (2, {}, None), (3, {}, {})])
    assert results == [] and states == {}
    assert stats.users == 3 and stats.matches == {"a": 1}


def test_stop_matching_exits_and_rematch_is_a_new_episode() -> None:
    results, states, stats = run([(1, {}, {"a": [4, 1, 2, "2026-11-01"]})])
    assert kinds(results) == [(1, "exit", "a", 4)]
    assert states == {1: {"a": [4, 0, 2, "2026-11-01"]}}
    results, states, _ = run([(1, {"a": 1}, states[1])])
    assert kinds(results) == [(1, "enter", "a", 5)]
    assert states[1]["a"][:2] == [5, 1]


def test_error_keeps_the_state_of_the_failing_rule() -> None:
    # "boom" was active; now it raises on the profile: no exit (no flicker, no re-mail)
    results, states, stats = run([(1, {}, {"boom": [1, 1, 3, "2026-11-01"]})])
    assert results == [] and states == {}
    assert stats.errors == {"boom": 1}


def test_group_keeps_only_the_highest_priority_match() -> None:
    results, states, stats = run([(1, {"g": 2}, None)])
    assert kinds(results) == [(1, "enter", "g-high", 1)]
    assert stats.matches == {"g-high": 1}
    # Then the high one stops matching: it exits and the low one enters
    results, states, _ = run([(1, {"g": 1}, states[1])])
    assert kinds(results) == [(1, "enter", "g-low", 1), (1, "exit", "g-high", 1)]


def test_restricted_run_evaluates_and_exits_only_its_rules() -> None:
    pack = CompiledPack(RULES, 50, only=["b", "g-low"])
    prev = {"a": [1, 1, 3, "2026-11-01"], "g-high": [1, 1, 3, "2026-11-01"]}
    # a is active but does not match any more; b matches; g-low matches but g-high
    # (same group, higher priority, outside the run) is active: it still wins
    results, states, stats = run([(1, {"b": 1, "g": 1}, prev)], pack)
    assert kinds(results) == [(1, "enter", "b", 1)]
    # it writes only its own rules' entries (the store merges them over a and g-high)
    assert states[1] == {"b": [1, 1, 3, "2026-11-24"]}
    assert stats.matches == {"b": 1}
    assert len(pack.ruleset) == 2


def test_disabled_rule_exits_but_quarantined_rule_is_frozen() -> None:
    prev = {"gone": [2, 1, 1, "2026-11-01"], "sick": [1, 1, 1, "2026-11-01"]}
    pack = CompiledPack(RULES, 50, frozen=["sick"])
    results, states, _ = run([(1, {}, prev)], pack)
    assert kinds(results) == [(1, "exit", "gone", 2)]
    assert states[1]["sick"] == prev["sick"]


def test_profile_rows_and_tuples_give_the_same_result() -> None:
    doc = {"a": 1, "b": 1}
    r1, s1, _ = run([(5, doc, None)])
    r2, s2, _ = run([ProfileRow(5, doc, {})])
    assert r1 == r2 and s1 == s2


def test_a_rule_that_stalls_only_when_explained_counts_as_failing() -> None:
    # Given a rule that matches everyone but loops on the why re-run (it can tell the
    # recording proxy from a dict)
    stalls = ActiveRule(
        key="stall", version=1, name="stall", group=None, priority=100,
        source=("def match(profile, ctx):\n    if isinstance(profile.values(), list):\n"
                "        while True:\n            pass\n    return True\n"),
        banner={"title": "t", "body": "", "link": ""}, email=None)
    rows = [ProfileRow(1, {"a": 1}, {}), ProfileRow(2, {"a": 2}, {})]

    # When the users enter
    results, _, stats = run(rows, CompiledPack([stalls], 20))

    # Then they enter (the match stands) and each stalled explain counts as an error
    # of the rule, which the error-rate policing quarantines
    assert kinds(results) == [(1, "enter", "stall", 1), (2, "enter", "stall", 1)]
    assert stats.errors["stall"] == 2
    assert "explain" in stats.error_samples["stall"]


def test_a_link_that_becomes_unsafe_when_rendered_is_refused() -> None:
    # Given a banner whose link comes from the profile
    linked = ActiveRule(
        key="linked", version=1, name="linked", group=None, priority=100,
        source="def match(profile, ctx):\n    return True\n",
        banner={"title": "t", "body": "", "link": "{{ profile.url }}"}, email=None)
    rows = [ProfileRow(1, {"url": "javascript:alert(1)"}, {}),
            ProfileRow(2, {"url": "/renew"}, {})]

    # When both enter
    results, _, stats = run(rows, CompiledPack([linked], 50))

    # Then the unsafe one goes out without content and is counted; the safe one shows
    by_user = {r["user_id"]: r for r in results}
    assert by_user[1]["banner"] is None
    assert by_user[2]["banner"]["link"] == "/renew"
    assert stats.errors["linked"] == 1
    assert "javascript" in stats.error_samples["linked"]
