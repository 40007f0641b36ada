"""The per-rule CPU budget (rules/budget.py): per profile and per batch."""

from __future__ import annotations

import threading
import time

import pytest

from base.errors import RuleTimeout
from rules import budget
from rules.budget import BudgetExceeded
from rules.context import make_context
from rules.ruleset import RuleSet, RuleSpec
from rules.sandbox import CompiledRule, compile_rule
from tests.fixtures.waiting import wait_for

BUDGET_MS = 30
CTX = make_context("2024-05-10")
LOOP = "def match(profile, ctx):\n    while True:\n        pass\n"
SWALLOW = (
    "def match(profile, ctx):\n"
    "    n = 0\n"
    "    while True:\n"
    "        try:\n"
    "            n = n + 1 / 0\n"
    "        except (ZeroDivisionError, KeyError, TypeError, ValueError):\n"
    "            n = n + 1\n"
)
TRUE = "def match(profile, ctx):\n    return True\n"
EMAIL = "def match(profile, ctx):\n    return profile['email'].endswith('.org')\n"


def _spin(seconds: float) -> None:
    # Pure-Python work: a stray interrupt would be raised in here.
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_infinite_loop_is_stopped_within_a_few_budgets_and_the_others_still_run() -> None:
    # Given an endless rule between two good ones
    rules = RuleSet(
        [
            RuleSpec("first", 1, TRUE, priority=300),
            RuleSpec("loop", 1, LOOP, priority=200),
            RuleSpec("last", 1, EMAIL, priority=100),
        ],
        budget_ms=BUDGET_MS,
    )

    # When a profile is evaluated
    t0 = time.perf_counter()
    outcome = rules.evaluate({"email": "a@b.org"}, CTX)
    elapsed = time.perf_counter() - t0

    # Then the loop is stopped after its budget (plus the watchdog's tick and the GIL
    # switch interval), and both good rules matched
    assert outcome.timeouts == ["loop"]
    assert outcome.matched == ["first", "last"]
    assert outcome.errors == {}
    assert BUDGET_MS / 1000 <= elapsed < BUDGET_MS / 1000 * 10


def test_a_rule_that_catches_exceptions_in_its_loop_is_still_stopped() -> None:
    # Given a rule that swallows every exception it may name, in an endless loop
    rules = RuleSet([RuleSpec("swallow", 1, SWALLOW), RuleSpec("ok", 1, TRUE)], budget_ms=BUDGET_MS)

    # When it runs / Then the interrupt goes through its handlers
    outcome = rules.evaluate({}, CTX)
    assert outcome.timeouts == ["swallow"]
    assert outcome.matched == ["ok"]


def test_the_interrupt_is_not_an_exception_rules_could_catch() -> None:
    # Given the interrupt class / Then no `except <name>` allowed in rules matches it
    from rules.guards import CATCHABLE

    assert not issubclass(BudgetExceeded, Exception)
    assert not any(issubclass(BudgetExceeded, exc) for exc in CATCHABLE.values())


def test_timeouts_on_many_profiles_leave_nothing_pending_for_the_caller() -> None:
    # Given a rule set where one rule always loops
    rules = RuleSet([RuleSpec("loop", 1, LOOP), RuleSpec("ok", 1, EMAIL)], budget_ms=15)

    # When it runs over several profiles, then the caller keeps computing
    outcomes = [rules.evaluate({"email": f"u{i}@x.org"}, CTX) for i in range(6)]
    _spin(0.1)

    # Then every profile records the timeout and the good rule, and no interrupt
    # reached the caller after the evaluation returned
    assert all(o.timeouts == ["loop"] and o.matched == ["ok"] for o in outcomes)


def test_threads_evaluating_at_once_are_stopped_independently() -> None:
    # Given one rule set shared by three threads, one rule of which loops
    rules = RuleSet([RuleSpec("loop", 1, LOOP), RuleSpec("ok", 1, EMAIL)], budget_ms=BUDGET_MS)
    results: dict[int, list] = {}

    def work(n: int) -> None:
        results[n] = [rules.evaluate({"email": f"{n}@x.org"}, CTX) for _ in range(2)]
        _spin(0.05)

    # When they evaluate concurrently
    threads = [threading.Thread(target=work, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)

    # Then each thread saw its own timeouts and good results
    assert sorted(results) == [0, 1, 2]
    for outcomes in results.values():
        assert [(o.timeouts, o.matched) for o in outcomes] == [(["loop"], ["ok"])] * 2


def test_a_sleeping_watchdog_is_woken_by_the_next_evaluation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a watchdog that parks itself after 50 ms without work
    monkeypatch.setattr(budget, "IDLE_AFTER_S", 0.05)
    rules = RuleSet([RuleSpec("loop", 1, LOOP)], budget_ms=BUDGET_MS)
    rules.evaluate({}, CTX)
    wait_for(lambda: budget.WATCHDOG.idle, "the watchdog to park itself", timeout=10, every=0.01)
    assert budget.WATCHDOG.idle

    # When an endless rule is evaluated
    outcome = rules.evaluate({}, CTX)

    # Then it is still stopped
    assert outcome.timeouts == ["loop"]


def test_compiled_rule_match_raises_rule_timeout() -> None:
    # Given a compiled endless rule with a 20 ms budget
    rule = compile_rule(LOOP, key="loop", budget_ms=20)

    # When it is called standalone / Then it raises RuleTimeout naming the rule
    with pytest.raises(RuleTimeout, match="'loop' exceeded its 20 ms budget"):
        rule.match({}, CTX)
    _spin(0.05)


def test_no_budget_lets_a_long_rule_finish() -> None:
    # Given a rule that runs ~0.1 s and a rule set without a budget
    slow = (
        "def match(profile, ctx):\n    n = 0\n"
        "    for i in range(300000):\n        n += 1\n    return n > 0\n"
    )
    rules = RuleSet([RuleSpec("slow", 1, slow)], budget_ms=0)

    # When it runs / Then it completes and matches
    assert rules.evaluate({}, CTX).matched == ["slow"]


def test_an_interrupt_landing_in_the_next_rule_blames_the_right_rule(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given three rules, where the watchdog's interrupt for the first one lands
    # only once the second has started (simulated: the second raises it itself)
    slot = budget.current_slot()
    calls = {"second": 0}

    def first(profile, ctx):
        return True

    def second(profile, ctx):
        calls["second"] += 1
        if calls["second"] == 1:
            slot.fired_seq = slot.box[0] - 1  # the interrupt was meant for "first"
            raise BudgetExceeded
        return True

    def third(profile, ctx):
        return True

    fns = {"a-first": first, "b-second": second, "c-third": third}
    monkeypatch.setattr(
        "rules.ruleset.compile_rule",
        lambda source, key, budget_ms: CompiledRule(key, source, fns[key], budget_ms),
    )
    rules = RuleSet([RuleSpec(k, 1, "") for k in fns], budget_ms=1000)

    # When a profile is evaluated
    outcome = rules.evaluate({}, CTX)

    # Then the first rule counts as timed out, the second was re-run and matched
    assert outcome.timeouts == ["a-first"]
    assert outcome.matched == ["b-second", "c-third"]
    assert calls["second"] == 2


def test_time_off_the_cpu_does_not_count_against_the_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a rule that is off the CPU for 5 budgets (as a rule of a starved worker
    # waiting for the CPU or the GIL would be), then does a little work
    def waits(profile, ctx):
        time.sleep(BUDGET_MS * 5 / 1000)
        _spin(0.002)
        return True

    monkeypatch.setattr(
        "rules.ruleset.compile_rule",
        lambda source, key, budget_ms: CompiledRule(key, source, waits, budget_ms),
    )
    rules = RuleSet([RuleSpec("waits", 1, "")], budget_ms=BUDGET_MS)
    if budget.current_slot().clock is None:
        pytest.skip("no per-thread CPU clock on this platform: the budget is wall time")

    # When it is evaluated / Then it is not interrupted: it used ~2 ms of CPU
    outcome = rules.evaluate({}, CTX)
    assert outcome.timeouts == [] and outcome.matched == ["waits"]


SLOW = (
    "def match(profile, ctx):\n"
    "    n = 0\n"
    "    for i in range(30000):\n"
    "        n = n + i\n"
    "    return n > 0\n"
)


def test_a_rule_slow_on_every_profile_spends_the_batch_budget_and_is_named() -> None:
    # Given a rule that takes a few ms per profile (far under its 50 ms per-profile
    # budget) beside a fast one, and a batch budget of 150 ms per rule
    rules = RuleSet(
        [RuleSpec("fast", 1, TRUE, priority=200), RuleSpec("slow", 1, SLOW)], budget_ms=50
    )
    slot = rules.open_batch(150)
    cpu0 = time.thread_time()

    # When profiles are evaluated until the watchdog says a rule spent the budget
    done = 0
    try:
        while slot.over < 0 and done < 2000:
            rules.evaluate({}, CTX)
            done += 1
    finally:
        charged = rules.close_batch(slot)
    used = time.thread_time() - cpu0

    # Then it named the slow rule, after about 150 ms of CPU, not at the first profile
    assert rules.keys[slot.over] == "slow"
    assert 1 < done < 2000
    assert charged["slow"] >= 0.150
    assert used >= 0.150
    # and the fast rule was charged far less (the charge is sampled: a few ticks)
    assert charged.get("fast", 0.0) < 0.05
    # and once closed, nothing is charged any more
    assert slot.cost is None


def test_without_an_open_batch_a_slow_rule_only_meets_the_per_profile_budget() -> None:
    # Given the same slow rule, evaluated with no batch open
    rules = RuleSet([RuleSpec("slow", 1, SLOW)], budget_ms=50)
    slot = budget.current_slot()
    slot.over = -1

    # When it runs on many profiles / Then it is never interrupted
    for _ in range(60):
        outcome = rules.evaluate({}, CTX)
        assert outcome.timeouts == [] and outcome.matched == ["slow"]
    assert slot.cost is None and slot.over == -1


def test_an_exception_passing_through_the_rules_disarms_the_watchdog(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a rule set whose rule raises KeyboardInterrupt (as a Ctrl-C would)
    def interrupted(profile, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(
        "rules.ruleset.compile_rule",
        lambda source, key, budget_ms: CompiledRule(key, source, interrupted, budget_ms),
    )
    rules = RuleSet([RuleSpec("ctrl-c", 1, "")], budget_ms=15)

    # When it propagates to the caller, who goes on working past the budget
    with pytest.raises(KeyboardInterrupt):
        rules.evaluate({}, CTX)
    _spin(0.08)

    # Then nothing was armed any more: no interrupt reached the caller
    assert budget.current_slot().box[0] == 0
