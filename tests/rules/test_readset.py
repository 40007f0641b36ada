"""Read-sets: what a rule can read of a profile, worked out from its source.

The property that matters: a change at a path outside a rule's read-set never
changes its answer (checked with hypothesis over the built-in pack and the 50
benchmark rules, on synthetic profiles)."""

from __future__ import annotations

import copy
import random
import sys
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvadrupel.synthetic import user
from rules.context import make_context
from rules.pack import BUILTIN_RULES
from rules.readset import affected, event_paths, read_set
from rules.ruleset import RuleSet, RuleSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from rules50 import RULES50  # noqa: E402

TODAY = date(2026, 11, 24)
SOURCES = {r["key"]: r["source"] for r in [*BUILTIN_RULES, *RULES50]}


def src(body: str) -> str:
    return "def match(profile, ctx):\n" + "".join(f"    {ln}\n" for ln in body.splitlines())


@pytest.mark.parametrize(("body", "want"), [
    ('return profile["a"]["b"] == 1', {"a.b"}),
    ('return profile.get("a", {}).get("b")', {"a.b"}),
    ('return get(profile, "a.b.c") and has(profile, "x.y")', {"a.b.c", "x.y"}),
    ('return dict.get(profile, "a") == 2', {"a"}),
    ('lic = profile.get("dl") or {}\nreturn lic.get("exp") == 1', {"dl"}),  # `or` tests all of dl
    ('lic = profile.get("dl")\nreturn lic["exp"] == 1 and lic["n"] > 2', {"dl.exp", "dl.n"}),
    ('x = profile.get("a") if ctx else profile.get("b")\nreturn x["k"]', {"a.k", "b.k"}),
    ('return len(profile.get("orders", []))', {"orders"}),
    ('return "vip" in profile.get("tags", [])', {"tags"}),
    ('return any(o.get("paid") for o in profile["orders"])', {"orders"}),
    ('return profile["list"][0]["x"]', {"list.0.x"}),
    ('return profile.get("a.b")', {"a.b"}),
])
def test_literal_access_narrows_the_read_set(body: str, want: set[str]) -> None:
    assert read_set(src(body)) == want


@pytest.mark.parametrize("body", [
    "return len(profile) > 3",
    'return profile[ctx.rule_key] == 1',
    'k = "a"\nreturn profile.get(k)',
    'return get(profile, "a." + ctx.tz)',
    "return helper(profile)\ndef helper(p):\n    return p['a']",
    'return any(v for v in profile.values())',
    'p = [profile]\nreturn p[0]["a"]',
])
def test_anything_dynamic_reads_every_path(body: str) -> None:
    assert read_set(src(body)) is None


def test_a_rule_that_shadows_the_helpers_gets_no_narrowing_through_them() -> None:
    source = src('return get(profile, "a")') + "\ndef get(p, path):\n    return p\n"
    assert read_set(source) is None
    assert read_set("x = 1\n") is None and read_set("def match(:\n") is None


def test_affected_and_event_paths() -> None:
    assert event_paths({"set": {"driver_license": {"expires_on": "2027-01-01"}, "a.b": 1,
                                "c": {}},
                        "unset": ["vehicle.plate"], "inc": {"orders.total": 1}}) == [
        "driver_license.expires_on", "a.b", "c", "vehicle.plate", "orders.total"]
    reads = frozenset({"driver_license.expires_on", "birth_date"})
    assert affected(reads, ["driver_license"])            # a parent replaced
    assert affected(reads, ["driver_license.expires_on"])
    assert affected(reads, ["birth_date.x"])              # below what it reads
    assert not affected(reads, ["driver_license.number", "orders.total"])
    assert affected(None, ["x"]) and affected(reads, None)


def test_most_benchmark_rules_have_narrow_read_sets() -> None:
    narrow = [k for k, s in SOURCES.items() if read_set(s) is not None]
    assert len(narrow) >= len(SOURCES) - 3


# -- the property -----------------------------------------------------------------
def _paths(doc: Any, prefix: str = "") -> list[str]:
    out = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            p = f"{prefix}{k}"
            out.append(p)
            out += _paths(v, p + ".")
    return out


def _mutate(doc: dict[str, Any], path: str, rng: random.Random) -> None:
    *heads, leaf = path.split(".")
    node = doc
    for h in heads:
        nxt = node.get(h)
        if not isinstance(nxt, dict):
            nxt = node[h] = {}
        node = nxt
    choice = rng.randrange(4)
    if choice == 0:
        node.pop(leaf, None)
    elif choice == 1:
        node[leaf] = rng.choice([None, 0, 7, "", "2026-12-01", "1990-11-24", [], {}, {"z": 1}])
    elif choice == 2:
        node[leaf] = rng.randint(-5, 50)
    else:
        node[leaf] = {"expires_on": "2026-12-10", "total": 99}


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), key=st.sampled_from(sorted(SOURCES)))
def test_a_change_outside_the_read_set_never_changes_the_answer(seed: int, key: str) -> None:
    reads = read_set(SOURCES[key])
    if reads is None:
        return
    rng = random.Random(seed)
    rules = RuleSet([RuleSpec(key, 1, SOURCES[key])], budget_ms=0)
    ctx = make_context(TODAY)
    extra = ["zz.new", "orders.total", "orders.last_at", "driver_license.number", "vehicle",
             "passport.number", "email", "birth_date", "devices.phone", "language"]
    for _ in range(20):
        doc = user(rng.randint(1, 10**6), TODAY, rng)
        before = rules.evaluate(doc, ctx)
        for path in rng.sample(_paths(doc) + extra, 6):
            if affected(reads, [path]):
                continue
            changed = copy.deepcopy(doc)
            _mutate(changed, path, rng)
            after = rules.evaluate(changed, ctx)
            assert (after.matched, sorted(after.errors)) == \
                (before.matched, sorted(before.errors)), (key, path, reads)
