"""A rule's goal (rules/goals.py): validated at compile, evaluated in the same rule
set as its rule, read-set and time horizon folded in, and conversions emitted only
within the attribution window of an episode that started before."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from base.errors import RuleCompileError
from engine.evaluate.evaluation import CompiledPack, RangeStats, evaluate_rows
from engine.messages import Convert, Enter, Exit
from rules.context import Context
from rules.goals import DEFAULT_WINDOW_DAYS, goal_window, in_window
from rules.readset import read_set
from rules.ruleset import ActiveRule
from rules.sandbox import compile_rule

D0 = date(2026, 11, 24)

RULE = '''"""Licence expiring; the goal: renewed."""

GOAL_WINDOW_DAYS = 14

def match(profile, ctx):
    left = days_until(get(profile, "driver_license.expires_on"), ctx)
    return left is not None and 0 <= left <= 30

def goal(p, ctx):
    since = days_since(get(p, "driver_license.renewed_on"), ctx)
    return since is not None and since >= 0
'''


def ctx(d: date) -> Context:
    return Context(today=d, now=datetime(d.year, d.month, d.day, tzinfo=ZoneInfo("UTC")),
                   tz="UTC")


def pack(source: str = RULE) -> CompiledPack:
    return CompiledPack([ActiveRule("renew", 3, "Renew", None, 100, source, None, None)], 50)


def run(p: CompiledPack, uid: int, doc: dict[str, Any], state: Any, d: date
        ) -> tuple[list[Any], Any, str | None]:
    results, states = evaluate_rows([(uid, doc, state)], p, ctx(d), None, RangeStats())
    (_, new, wake), = states
    return results, new if new is not None else state, wake


# -- compile and validation ----------------------------------------------------------------
def test_a_goal_and_its_window_compile_with_the_rule() -> None:
    c = compile_rule(RULE, "renew")
    assert c.goal_window == 14 and goal_window(RULE) == 14
    g = compile_rule(RULE, "renew", entry="goal")
    assert g.match({"driver_license": {"renewed_on": "2026-11-01"}}, ctx(D0)) is True
    assert g.match({}, ctx(D0)) is False
    no_goal = "def match(profile, ctx):\n    return True\n"
    assert compile_rule(no_goal).goal_window is None and goal_window(no_goal) is None
    default = no_goal + "def goal(profile, ctx):\n    return False\n"
    assert compile_rule(default).goal_window == DEFAULT_WINDOW_DAYS == goal_window(default)


@pytest.mark.parametrize(("source", "message"), [
    ("def goal(profile):\n    return True\n", "`goal` must take exactly two arguments"),
    ("def goal(profile, ctx, x):\n    return True\n", "`goal` must take exactly two"),
    ("def goal(p, c):\n    return True\ndef goal(p, c):\n    return False\n",
     "`goal` is defined more than once"),
    ("goal = 3\n", "`goal` must be a function"),
    ("GOAL_WINDOW_DAYS = 0\ndef goal(p, c):\n    return True\n", "from 1 to 365"),
    ("GOAL_WINDOW_DAYS = 366\ndef goal(p, c):\n    return True\n", "from 1 to 365"),
    ("GOAL_WINDOW_DAYS = 7.5\ndef goal(p, c):\n    return True\n", "from 1 to 365"),
    ("GOAL_WINDOW_DAYS = True\ndef goal(p, c):\n    return True\n", "from 1 to 365"),
    ("GOAL_WINDOW_DAYS = 7\n", "defines no `def goal"),
    ("def goal(p, c):\n    return p.__class__\n", "__class__"),
    ("def goal(p, c):\n    import os\n    return True\n", "imports are not allowed"),
])
def test_bad_goal_code_is_refused_with_a_reason(source: str, message: str) -> None:
    with pytest.raises(RuleCompileError, match=message):
        compile_rule("def match(profile, ctx):\n    return True\n" + source, "r")


def test_the_goal_runs_in_the_sandbox() -> None:
    src = ("def match(profile, ctx):\n    return False\n"
           "def goal(profile, ctx):\n    profile['x'] = 1\n    return True\n")
    p = pack(src)
    results, state, _ = run(p, 1, {}, {"renew": [1, 1, 3, D0.isoformat()]}, D0)
    assert not any(isinstance(r, Convert) for r in results)  # the write was refused


def test_a_failing_goal_counts_as_its_rule_failing() -> None:
    src = ("def match(profile, ctx):\n    return True\n"
           "def goal(profile, ctx):\n    return profile['missing']\n")
    stats = RangeStats()
    results, states = evaluate_rows([(1, {}, None)], pack(src), ctx(D0), None, stats)
    assert stats.errors == {"renew": 1} and "goal: KeyError" in stats.error_samples["renew"]
    assert [type(r) for r in results] == [Enter]


# -- read-set and horizon ------------------------------------------------------------------
def test_the_goals_reads_join_the_rules_read_set() -> None:
    assert read_set(RULE) == {"driver_license.expires_on", "driver_license.renewed_on"}


def test_the_goals_horizon_joins_the_users_wake_date() -> None:
    p = pack()
    doc = {"driver_license": {"expires_on": (D0 + timedelta(days=20)).isoformat(),
                              "renewed_on": (D0 + timedelta(days=3)).isoformat()}}
    _, state, wake = run(p, 1, doc, None, D0)
    # the rule alone would wake the user only when the licence has expired (day 21)
    assert wake is not None and date.fromisoformat(wake) <= D0 + timedelta(days=3)
    # and on that date the goal holds
    results, _, _ = run(p, 1, doc, state, D0 + timedelta(days=3))
    assert [type(r) for r in results] == [Convert]


# -- conversions -----------------------------------------------------------------------------
def test_a_conversion_needs_an_episode_and_an_open_window() -> None:
    p = pack()
    expiring = {"driver_license": {"expires_on": (D0 + timedelta(days=10)).isoformat()}}
    renewed = {"driver_license": {"expires_on": "2036-01-01", "renewed_on": D0.isoformat()}}
    # the goal already holds when the episode starts: it converts at once, after the enter
    both = {"driver_license": {**expiring["driver_license"], "renewed_on": D0.isoformat()}}
    results, state, _ = run(p, 1, both, None, D0)
    assert [type(r) for r in results] == [Enter, Convert]
    assert (results[1].episode, results[1].started, results[1].as_of) == (
        1, D0.isoformat(), D0.isoformat())
    # seen again later: the delivery side keeps the first (channels/goals.py)
    results, _, _ = run(p, 1, both, state, D0 + timedelta(days=1))
    assert [type(r) for r in results] == [Convert]
    # no episode at all: nothing to convert
    assert run(p, 2, renewed, None, D0)[0] == []
    # within the window, also after the episode ended (the renewal ends the match)
    results, state1, _ = run(p, 3, expiring, None, D0)
    results, _, _ = run(p, 3, renewed, state1, D0 + timedelta(days=14))
    conv = [r for r in results if isinstance(r, Convert)]
    assert [type(r) for r in results] == [Convert, Exit]
    assert (conv[0].rule, conv[0].episode, conv[0].version, conv[0].started, conv[0].as_of) == (
        "renew", 1, 3, D0.isoformat(), (D0 + timedelta(days=14)).isoformat())
    # one day past the window: nothing
    results, _, _ = run(p, 3, renewed, state1, D0 + timedelta(days=15))
    assert not any(isinstance(r, Convert) for r in results)
    assert in_window(D0, D0, 1) and in_window(D0, D0 + timedelta(days=1), 1)
    assert not in_window(D0, D0 + timedelta(days=2), 1)
    assert not in_window(D0, D0 - timedelta(days=1), 1)


def test_a_goals_cpu_is_charged_to_its_rule() -> None:
    p = CompiledPack([ActiveRule("renew", 3, "Renew", None, 100, RULE, None, None)], 50,
                     batch_budget_ms=10_000)
    stats = RangeStats()
    doc = {"driver_license": {"expires_on": "2026-12-01", "renewed_on": "2026-11-01"}}
    evaluate_rows([(u, doc, None) for u in range(1, 30_000)], p, ctx(D0), None, stats)
    assert set(stats.cpu) == {"renew"}  # charged (sampled), and to the rule's own key


def test_a_goal_that_overruns_its_budget_is_confirmed_against_its_rule() -> None:
    from engine.evaluate.evaluation import confirm_timeout

    src = ("def match(profile, ctx):\n    return True\n"
           "def goal(profile, ctx):\n    n = 0\n    while True:\n        n += 1\n")
    p = CompiledPack([ActiveRule("loop", 1, "Loop", None, 100, src, None, None)], 20)
    stats = RangeStats()
    evaluate_rows([(1, {}, None)], p, ctx(D0), None, stats)
    assert stats.timeouts == {"loop": 1}  # the rule's own key
    assert confirm_timeout(p, "loop", {}, ctx(D0)) is True  # so it is quarantined
    fine = CompiledPack([ActiveRule("ok", 1, "Ok", None, 100, RULE, None, None)], 20)
    assert confirm_timeout(fine, "ok", {}, ctx(D0)) is False
