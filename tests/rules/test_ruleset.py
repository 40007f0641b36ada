"""RuleSet: ordering, per-rule contexts, error isolation, fuzzing and a differential check."""

from __future__ import annotations

import builtins
import copy
import random
from datetime import date, timedelta

import pytest
from hypothesis import HealthCheck, given, settings

from base.errors import RuleCompileError
from rules import helpers
from rules.context import make_context
from rules.pack import BUILTIN_RULES
from rules.ruleset import Outcome, RuleSet, RuleSpec
from tests.rules.profiles import json_profiles, random_profile

CTX = make_context("2024-05-10")
TRUE = "def match(profile, ctx):\n    return True\n"


def pack_specs() -> list[RuleSpec]:
    return [RuleSpec(r["key"], 1, r["source"], r["priority"], r["group"]) for r in BUILTIN_RULES]


def test_matches_come_by_priority_then_key() -> None:
    # Given rules of mixed priorities / When all match
    rules = RuleSet(
        [
            RuleSpec("b", 1, TRUE, 100),
            RuleSpec("a", 1, TRUE, 100),
            RuleSpec("z", 1, TRUE, 500),
            RuleSpec("c", 1, TRUE, 1),
        ]
    )
    # Then they are listed highest priority first, ties by key
    assert rules.evaluate({}, CTX).matched == ["z", "a", "b", "c"]
    assert rules.keys == ("z", "a", "b", "c") and len(rules) == 4


def test_each_rule_sees_its_own_key_and_version_in_ctx() -> None:
    # Given two rules that only match when ctx names them
    check = (
        "def match(profile, ctx):\n"
        "    return (ctx.rule_key, ctx.rule_version, str(ctx.today)) == {!r}\n"
    )
    rules = RuleSet(
        [
            RuleSpec("one", 3, check.format(("one", 3, "2024-05-10"))),
            RuleSpec("two", 7, check.format(("two", 7, "2024-05-10"))),
        ]
    )

    # When evaluated twice with the same ctx / Then both match, and the per-rule
    # contexts were built once for that ctx
    assert rules.evaluate({}, CTX).matched == ["one", "two"]
    first = rules._cc[1]
    assert rules.evaluate({}, CTX).matched == ["one", "two"]
    assert rules._cc[1] is first

    # And a new ctx gets new per-rule contexts
    assert rules.evaluate({}, make_context("2024-05-11")).matched == []


def test_a_failing_rule_is_recorded_and_the_others_continue() -> None:
    # Given a rule raising KeyError among good ones
    rules = RuleSet(
        [
            RuleSpec("bad", 1, "def match(profile, ctx):\n    return profile['x']\n", 200),
            RuleSpec("zero", 1, "def match(profile, ctx):\n    return 1 / 0\n", 150),
            RuleSpec("good", 1, TRUE, 100),
        ]
    )

    # When evaluated / Then errors read "Type: message", and the good rule matched
    outcome = rules.evaluate({}, CTX)
    assert outcome == Outcome(
        matched=["good"],
        errors={"bad": "KeyError: 'x'", "zero": "ZeroDivisionError: division by zero"},
        timeouts=[],
    )


def test_error_messages_are_bounded() -> None:
    # Given a rule raising with a huge message and one raising with a huge structure
    rules = RuleSet(
        [
            RuleSpec("long", 1, "def match(profile, ctx):\n    raise ValueError('x' * 100000)\n"),
            RuleSpec(
                "big",
                1,
                "def match(profile, ctx):\n    raise ValueError(['y' * 100000] * 100000)\n",
            ),
        ]
    )
    # When evaluated / Then the messages stay short
    errors = rules.evaluate({}, CTX).errors
    assert errors["long"].startswith("ValueError: xxx") and len(errors["long"]) < 600
    assert errors["big"] == "ValueError: <list>"


def test_compile_errors_name_the_rule_and_duplicates_are_refused() -> None:
    # Given a broken rule among good ones / Then RuleSet names it, with the line
    with pytest.raises(RuleCompileError) as info:
        RuleSet(
            [
                RuleSpec("ok", 1, TRUE),
                RuleSpec("broken", 1, "def match(profile, ctx):\n    import os\n"),
            ]
        )
    assert info.value.key == "broken" and info.value.line == 2
    assert "rule 'broken': imports are not allowed" in str(info.value)

    # Given two rules with one key / Then it is refused
    with pytest.raises(ValueError, match="duplicate rule keys: x"):
        RuleSet([RuleSpec("x", 1, TRUE), RuleSpec("x", 2, TRUE)])


def test_an_empty_rule_set_matches_nothing() -> None:
    # Given no rules / Then every profile has an empty outcome
    assert RuleSet([]).evaluate({"a": 1}, CTX) == Outcome()


def test_evaluate_many_pairs_outcomes_with_user_ids() -> None:
    # Given a rule on the e-mail domain and three users
    rules = RuleSet(
        [
            RuleSpec(
                "org", 1, "def match(profile, ctx):\n    return profile['email'].endswith('.org')\n"
            )
        ]
    )
    users = [(1, {"email": "a@x.org"}), (2, {"email": "b@x.com"}), (3, {})]

    # When evaluated together / Then each id comes with its own outcome
    got = [(uid, o.matched, sorted(o.errors)) for uid, o in rules.evaluate_many(users, CTX)]
    assert got == [(1, ["org"], []), (2, [], []), (3, [], ["org"])]


def test_rules_cannot_change_what_other_rules_see() -> None:
    # Given rules that try every way to alter the profile, and one that reads it after them
    writers = [
        "profile['email'] = 'x'",
        "profile['driver_license']['expires_on'] = '1999-01-01'",
        "get(profile, 'driver_license').update({'expires_on': '1999-01-01'})",
        "profile['tags'].append('evil')",
        "t = profile['tags']\n    t += ['evil']",
        "profile.pop('email')",
        "profile['tags'].sort(reverse=True)",
    ]
    specs = [
        RuleSpec(f"w{i}", 1, f"def match(profile, ctx):\n    {src}\n    return True\n", 200)
        for i, src in enumerate(writers)
    ]
    reader = (
        "def match(profile, ctx):\n    return profile == {'email': 'a@x.org', 'tags': ['a', 'b'], "
        "'driver_license': {'expires_on': '2030-01-01'}}\n"
    )
    rules = RuleSet([*specs, RuleSpec("reader", 1, reader, 100)])
    profile = {
        "email": "a@x.org",
        "tags": ["a", "b"],
        "driver_license": {"expires_on": "2030-01-01"},
    }
    before = copy.deepcopy(profile)

    # When evaluated / Then every write was refused, the reader saw the original,
    # and so does the caller
    outcome = rules.evaluate(profile, CTX)
    assert outcome.matched == ["reader"]
    assert all("read-only" in outcome.errors[s.key] for s in specs), outcome.errors
    assert profile == before


def test_rules_may_build_and_change_their_own_containers() -> None:
    # Given a rule copying part of the profile and working on the copy
    source = """
def match(profile, ctx):
    tags = list(profile["tags"])
    tags.append("new")
    tags.sort()
    counts = {}
    for t in tags:
        counts[t] = counts.get(t, 0) + 1
    mine = dict(profile)
    mine["email"] = "changed"
    del mine["tags"]
    return tags == ["a", "new"] and counts["a"] == 1 and mine["email"] == "changed"
"""
    profile = {"email": "a@x.org", "tags": ["a"]}
    # When evaluated / Then it matches and the profile is untouched
    assert RuleSet([RuleSpec("own", 1, source)]).evaluate(profile, CTX).matched == ["own"]
    assert profile == {"email": "a@x.org", "tags": ["a"]}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_profiles)
def test_random_documents_never_crash_the_built_in_pack(profile) -> None:
    # Given any JSON document as a profile
    rules = _PACK
    before = copy.deepcopy(profile)

    # When the built-in pack evaluates it
    outcome = rules.evaluate(profile, CTX)

    # Then it returns an outcome (rules' errors recorded, not raised), nothing times out,
    # and the document is unchanged
    assert set(outcome.matched) | set(outcome.errors) <= set(rules.keys)
    assert not set(outcome.matched) & set(outcome.errors)
    assert outcome.timeouts == []
    assert repr(profile) == repr(before)  # repr: NaN != NaN


_PACK = RuleSet(pack_specs())


def _plain_pack() -> list[tuple[str, object]]:
    fns = []
    for spec in sorted(pack_specs(), key=lambda s: (-s.priority, s.key)):
        namespace = {"__builtins__": builtins, **helpers.HELPERS}
        exec(compile(spec.source, spec.key, "exec"), namespace)  # noqa: S102 - trusted test code
        fns.append((spec.key, namespace["match"]))
    return fns


def test_sandboxed_pack_agrees_with_plain_python_on_2000_profiles() -> None:
    # Given the built-in pack sandboxed, and the same sources exec'd as plain Python
    plain = _plain_pack()
    rng = random.Random(20240510)
    mismatches = []
    matched_any = set()

    # When both evaluate 2,000 generated profiles on various days
    for i in range(2000):
        as_of = date(2024, 1, 1) + timedelta(days=rng.randint(0, 800))
        ctx = make_context(as_of)
        profile = random_profile(rng, as_of, uid=i)
        expect, expect_errors = [], set()
        for key, fn in plain:
            try:
                if fn(profile, ctx):
                    expect.append(key)
            except Exception:
                expect_errors.add(key)
        got = _PACK.evaluate(profile, ctx)
        matched_any.update(got.matched)
        if (got.matched, set(got.errors), got.timeouts) != (expect, expect_errors, []):
            mismatches.append((profile, as_of, got, expect, expect_errors))

    # Then they agree on every profile, and every rule matched somewhere
    assert mismatches == []
    assert matched_any == set(_PACK.keys)
