"""compile_rule, CompiledRule and Context: what callers of the sandbox rely on."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from base.errors import RuleCompileError, RuleRuntimeError
from rules.context import Context, make_context
from rules.sandbox import MAX_SOURCE_CHARS, compile_rule

CTX = make_context("2024-05-10")


def test_a_valid_rule_compiles_and_matches() -> None:
    # Given a rule using helpers, a module constant, a nested function and a lambda
    source = '''
"""Licence expiring soon, for Russian speakers."""
DAYS = 30
LANGS = ("ru", "by")

def soon(d, ctx):
    left = days_until(d, ctx)
    return left is not None and 0 <= left <= DAYS

def match(profile, ctx):
    ok = lambda lang: lang in LANGS
    return soon(get(profile, "driver_license.expires_on"), ctx) and ok(profile.get("language"))
'''
    # When compiled / Then it runs like the plain function would
    rule = compile_rule(source, key="dl-ru")
    assert rule.key == "dl-ru" and rule.source == source
    assert rule.match({"language": "ru", "driver_license": {"expires_on": "2024-05-20"}}, CTX)
    assert not rule.match({"language": "en", "driver_license": {"expires_on": "2024-05-20"}}, CTX)


def test_ordinary_python_still_works_inside_rules() -> None:
    # Given a rule using comprehensions, unpacking, f-strings, %, augmented assignment,
    # local containers, slicing, sorted/min/max, isinstance and str()
    source = """
def match(profile, ctx):
    pairs = [(k, v) for k, v in sorted(profile.items()) if isinstance(v, int)]
    total = 0
    for _, v in pairs:
        total += v
    first, *rest = [v for _, v in pairs]
    seen = {}
    seen["n"] = len(rest)
    names = []
    names.append(f"{first:03d}-{total}")
    names += ["x"]
    label = "%s/%d" % (names[0], seen["n"])
    return label == "001-6/2" and str(total) == "6" and isinstance(label, str) \\
        and max(rest) * 2 == 6 \\
        and ", ".join(names[:2]) == "001-6, x" and "a-b".replace("-", "+") == "a+b"
"""
    assert compile_rule(source).match({"a": 1, "b": 2, "c": 3, "s": "x"}, CTX) is True


@pytest.mark.parametrize(
    ("source", "line", "fragment"),
    [
        ("def match(profile, ctx):\n    return (\n", 2, "SyntaxError"),
        (
            "def match(profile, ctx):\n    x = 1\n    import os\n    return x\n",
            3,
            "imports are not allowed",
        ),
        ("\n\ndef match(profile, ctx):\n    return profile.__dict__\n", 4, '"__dict__"'),
        ("def match(profile, ctx):\n    break\n", 2, "SyntaxError"),
        ("def check(profile, ctx):\n    return True\n", 1, "must define"),
        ("def match(profile, ctx, extra):\n    return True\n", 1, "exactly two arguments"),
        (
            "def match(profile, ctx):\n    return True\n\n"
            "def match(profile, ctx):\n    return False\n",
            4,
            "defined more than once",
        ),
    ],
)
def test_compile_errors_say_why_and_on_which_line(source: str, line: int, fragment: str) -> None:
    # Given a faulty rule / When compiled
    # Then RuleCompileError carries the reason and the 1-based line
    with pytest.raises(RuleCompileError) as info:
        compile_rule(source)
    assert fragment in info.value.reason
    assert info.value.line == line
    assert str(info.value).startswith(f"line {line}: ")


def test_oversized_odd_and_deeply_nested_sources_are_refused() -> None:
    # Given sources no analyst writes / Then each is a RuleCompileError, not a crash
    with pytest.raises(RuleCompileError, match="longer than"):
        compile_rule("#" * (MAX_SOURCE_CHARS + 1))
    with pytest.raises(RuleCompileError, match="must be a string"):
        compile_rule(b"def match(p, c): pass")  # type: ignore[arg-type]
    with pytest.raises(RuleCompileError):
        compile_rule("def match(profile, ctx):\n    return " + "(" * 5000 + ")" * 5000 + "\n")


def test_compiler_warnings_do_not_break_compilation() -> None:
    # Given a rule the compiler warns about (and warnings are errors in this test run)
    source = 'def match(profile, ctx):\n    return profile.get("n") is 1 or "\\d" == "x"\n'

    # When compiled / Then it compiles and runs
    assert compile_rule(source).match({"n": 1}, CTX) in (True, False)


def test_match_wraps_rule_errors_and_protects_the_profile() -> None:
    # Given rules that fail and that try to write
    missing = compile_rule("def match(profile, ctx):\n    return profile['nope']\n")
    writer = compile_rule("def match(profile, ctx):\n    profile['x'] = 1\n")
    profile = {"a": 1}

    # When called standalone / Then errors come out as RuleRuntimeError("KeyError: 'nope'")
    with pytest.raises(RuleRuntimeError, match="KeyError: 'nope'"):
        missing.match(profile, CTX)
    with pytest.raises(RuleRuntimeError, match="read-only"):
        writer.match(profile, CTX)
    assert profile == {"a": 1}


def test_rule_functions_reach_nothing_but_their_builtins() -> None:
    # Given a compiled rule / Then its globals' builtins are the restricted set
    rule = compile_rule("def match(profile, ctx):\n    return True\n")
    builtins = rule.raw.__globals__["__builtins__"]
    for name in ("open", "__import__", "eval", "exec", "getattr", "type", "print", "globals"):
        assert name not in builtins
    assert "days_until" in builtins and "len" in builtins


# -- Context -----------------------------------------------------------------------


def test_make_context_from_a_date_is_deterministic() -> None:
    # Given an as-of date / When a context is made / Then today is it and now is its midnight in tz
    c = make_context(date(2024, 5, 10), tz="Europe/Moscow")
    assert c.today == date(2024, 5, 10) and c.tz == "Europe/Moscow"
    assert c.now.isoformat() == "2024-05-10T00:00:00+03:00"
    assert make_context("2024-05-10") == c


def test_make_context_converts_now_to_the_time_zone() -> None:
    # Given an aware instant late on 9 May UTC / Then in Moscow it is already 10 May
    c = make_context(now=datetime(2024, 5, 9, 22, 30, tzinfo=UTC))
    assert c.today == date(2024, 5, 10) and c.now.hour == 1
    naive = make_context(now=datetime(2024, 5, 9, 22, 30), tz="UTC")
    assert naive.today == date(2024, 5, 9) and naive.now.utcoffset().total_seconds() == 0
    assert make_context().now.tzinfo is not None
    with pytest.raises(ValueError, match="unknown time zone"):
        make_context(tz="Mars/Olympus")


def test_context_is_frozen_and_spreads_like_a_mapping() -> None:
    # Given a context / Then it cannot be changed, and {**ctx} gives its fields and itself
    c = make_context("2024-05-10")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.today = date(2000, 1, 1)  # type: ignore[misc]
    spread = {**c}
    assert spread["today"] == date(2024, 5, 10) and spread["ctx"] is c and spread["rule_key"] == ""
    with pytest.raises(KeyError):
        c["nope"]
    assert isinstance(c, Context)


def test_the_examples_in_the_rules_documentation_compile_and_run() -> None:
    # Given every Python example of docs/rules.md that defines a rule
    doc = (Path(__file__).resolve().parents[2] / "docs" / "rules.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "def match(" in b]
    assert len(blocks) >= 3

    # When each is compiled and run on a sample profile / Then none fails
    profile = {
        "birth_date": "2004-05-03",
        "passport": {"issued_on": "2018-01-01"},
        "driver_license": {"expires_on": "2024-05-20"},
        "vehicle": {"plate": "A1 77"},
        "orders": {"total": 9, "last_at": "2024-05-01"},
    }
    assert [compile_rule(b).match(profile, CTX) for b in blocks] == [True, True, True]
