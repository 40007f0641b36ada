"""The 365-day lookahead (the approval rule's blast radius) against an oracle in plain
Python, on a few dozen profiles: date-independent rules, time bombs, rules that only
start matching in 200 days, the evaluation budget's sampled upper bound."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest

from catalogue.audience import date_dependence, lookahead, wilson_cc
from kvadrupel.container import Container
from kvadrupel.settings import Settings
from rules.ruleset import RuleSpec

AS_OF = date(2026, 11, 24)
N = 48


def _doc(uid: int) -> dict[str, Any]:
    """Users 0..11: a document expiring in 200 days; 12..15: in 400 days (outside the
    year); 16..: in the past. Every other user has a car."""
    i = uid - 5000
    if i < 12:
        expires = AS_OF + timedelta(days=200)
    elif i < 16:
        expires = AS_OF + timedelta(days=400)
    else:
        expires = AS_OF - timedelta(days=i)
    doc: dict[str, Any] = {"name": f"user {uid}", "doc": {"expires_on": expires.isoformat()}}
    if i % 2 == 0:
        doc["vehicle"] = {"plate": f"A{i:03d}BC"}
    return doc


DOCS = {uid: _doc(uid) for uid in range(5000, 5000 + N)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    settings = Settings(data_dir=Path(tmp_path_factory.mktemp("look")), admin_token="a" * 24)
    c = Container(settings)
    c.migrate()
    for shard, uids in c.shards.router.split(DOCS).items():
        c.shards.stores[shard].put_profiles([(u, DOCS[u]) for u in uids])
    yield c.shards
    c.close()


def spec(source: str, key: str = "r") -> RuleSpec:
    return RuleSpec(key=key, version=1, source="def match(profile, ctx):\n" + source)


def run(shards: Any, source: str, **kw: Any) -> dict[str, Any]:
    return lookahead(shards, spec(source), AS_OF, sample="all", seed=1, **kw)


def test_date_independent_rule_counts_today_only(shards: Any) -> None:
    got = run(shards, "    return has(profile, 'vehicle') and ctx.tz != ''\n")
    today = sum("vehicle" in d for d in DOCS.values())
    assert got["matches_today"] == today == got["matches"] == N // 2
    assert got["audience"] == {"estimate": today, "low": today, "high": today, "exact": True}
    assert got["date_dependent"] is False and not got["sampled"]
    # no day-by-day scan: day 0 for everyone plus the probes
    assert got["checked"] == 0 and got["evaluations"] < N * 10


def test_time_bomb_counts_everyone_who_matches_tomorrow(shards: Any) -> None:
    tomorrow = (AS_OF + timedelta(days=1)).isoformat()
    got = run(shards, f"    return ctx.today >= date('{tomorrow}')\n")
    assert got["matches_today"] == 0 and got["today"]["high"] == 0
    assert got["audience"]["high"] == got["matches"] == N and got["audience"]["exact"]
    assert got["date_dependent"] and "reads ctx.today" in got["reasons"]
    assert got["first_new_match"] == tomorrow
    assert got["evaluations"] == 2 * N  # each user stops at its first match


def test_december_rule(shards: Any) -> None:
    got = run(shards, "    return ctx.today.month == 12\n")
    assert got["matches_today"] == 0 and got["audience"]["high"] == N
    assert got["first_new_match"] == "2026-12-01"


def test_rule_matching_in_200_days_counts_those_users(shards: Any) -> None:
    got = run(
        shards,
        "    left = days_until(get(profile, 'doc.expires_on'), ctx)\n"
        "    return left is not None and 0 <= left <= 7\n",
    )
    truth = {
        u
        for u, d in DOCS.items()
        for k in range(366)
        if 0 <= (date.fromisoformat(d["doc"]["expires_on"]) - (AS_OF + timedelta(days=k))).days <= 7
    }
    assert len(truth) == 12  # the 400-day ones stay out, the expired ones never match
    assert got["matches_today"] == 0
    assert got["audience"] == {"estimate": 12, "low": 12, "high": 12, "exact": True}
    assert got["first_new_match"] == (AS_OF + timedelta(days=193)).isoformat()
    assert {e["user_id"] for e in got["new_examples"]} == truth
    assert got["date_dependent"] and "calls days_until(…, ctx)" in got["reasons"]


def test_budget_falls_back_to_a_sampled_upper_bound(shards: Any) -> None:
    source = (
        "    left = days_until(get(profile, 'doc.expires_on'), ctx)\n"
        "    return left is not None and 0 <= left <= 7\n"
    )
    full = run(shards, source)
    cut = run(shards, source, max_evaluations=N + 10 * 365)
    assert cut["sampled"] and not cut["audience"]["exact"]
    assert 0 < cut["checked"] < cut["pending"] == N
    assert cut["evaluations"] <= N + 10 * 365
    assert cut["audience"]["high"] >= full["matches"]  # an upper bound, conservatively wide
    assert cut["audience"]["low"] <= full["matches"]
    assert any("budget" in r for r in cut["reasons"])
    # no budget at all for the scan: the bound is everyone who does not match today
    none = run(shards, source, max_evaluations=N)
    assert none["checked"] == 0 and none["audience"]["high"] == N


def test_real_clock_rules_count_as_everyone(shards: Any) -> None:
    got = run(shards, "    return ctx.now.now().year > 2200\n")
    assert got["system_clock"] and got["unbounded"] and got["date_dependent"]
    assert got["audience"]["high"] == N


def test_errors_do_not_count_as_matches(shards: Any) -> None:
    got = run(shards, "    return profile['vehicle']['plate'] > '' and ctx.today.day == 1\n")
    assert got["errors"] == N // 2  # no car: KeyError every day
    assert got["audience"]["high"] == N // 2


def test_sandbox_children_give_the_same_answers(shards: Any) -> None:
    """Through the sandbox's child processes (RuleRunner.grid, in growing day blocks)
    the counts are the local rule set's."""
    from rules.isolation import SandboxPool
    from rules.remote import CHILD_MODULE, RuleRunner

    runner = RuleRunner(SandboxPool(CHILD_MODULE, size=1), 50.0)
    try:
        for source in (
            "    left = days_until(get(profile, 'doc.expires_on'), ctx)\n"
            "    return left is not None and 0 <= left <= 7\n",
            f"    return ctx.today >= date('{(AS_OF + timedelta(days=1)).isoformat()}')\n",
            "    return has(profile, 'vehicle')\n",
        ):
            local = run(shards, source)
            remote = run(shards, source, runner=runner)
            for k in ("audience", "matches_today", "first_new_match", "date_dependent"):
                assert remote[k] == local[k], (k, source)
    finally:
        runner.pool.close()


def test_date_dependence_from_the_source() -> None:
    def dep(body: str, head: str = "def match(profile, ctx):\n") -> dict[str, Any]:
        return date_dependence(head + body)

    assert not dep("    return ctx.rule_key == 'x' and has(profile, 'a')\n")["reads_date"]
    assert not dep("    return date(get(profile, 'a')) is not None\n")["reads_date"]
    assert dep("    return ctx.today.month == 12\n")["reasons"] == ["reads ctx.today"]
    assert dep("    return ctx.now.hour == 0\n")["reasons"] == ["reads ctx.now"]
    assert dep("    return age(get(profile, 'b'), ctx) > 60\n")["reads_date"]
    assert dep("    return helper(ctx)\n\ndef helper(c):\n    return c.today.day == 1\n")[
        "reads_date"
    ]
    assert dep("    return c['today'].day == 1\n", "def match(p, c):\n")["reads_date"]
    assert dep("    return True\n", "def match(*args):\n")["reads_date"]
    clock = dep("    return ctx.now.now().year > 2030\n")
    assert clock["system_clock"] and clock["reads_date"]
    assert date_dependence("def match(:\n")["reads_date"]  # unparsable: conservative


def test_wilson_cc_bounds() -> None:
    lo, hi = wilson_cc(0, 100)
    assert lo == 0.0 and 0.026 < hi < 0.04  # about 3/n, like the rule of three
    lo, hi = wilson_cc(50, 100)
    assert lo < 0.5 < hi and hi - 0.5 < 0.1
    assert wilson_cc(5, 5)[1] == 1.0 and wilson_cc(0, 0) == (0.0, 1.0)
