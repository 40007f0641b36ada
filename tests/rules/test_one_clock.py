"""Rules and templates see the date through ctx only: the class methods of
date/datetime that read the machine's clock are refused (one clock, issue 13)."""

from __future__ import annotations

import pytest

from base.errors import ChannelError, RuleError
from rules.context import make_context
from rules.ruleset import RuleSet, RuleSpec
from rules.templates import render_template

CTX = make_context("2026-11-24")


@pytest.mark.parametrize("expr", [
    "ctx.now.now()", "ctx.today.today()", "ctx.now.utcnow()",
    "ctx.now.fromtimestamp(0)", "ctx.today.fromtimestamp(0)",
    "(lambda d: d.now())(ctx.now)",
])
def test_a_rule_cannot_read_the_machine_clock(expr: str) -> None:
    rules = RuleSet([RuleSpec("r", 1, f"def match(profile, ctx):\n    return {expr}\n")], 0)
    outcome = rules.evaluate({}, CTX)
    assert "machine's clock" in outcome.errors["r"]


def test_a_rule_still_reads_ctx_now_and_today() -> None:
    src = "def match(profile, ctx):\n    return ctx.now.date() == ctx.today\n"
    assert RuleSet([RuleSpec("r", 1, src)], 0).evaluate({}, CTX).matched == ["r"]


@pytest.mark.parametrize("tpl", ["{{ ctx.now.now() }}", "{{ today.today() }}",
                                 "{{ now.utcnow() }}"])
def test_a_template_cannot_read_the_machine_clock(tpl: str) -> None:
    with pytest.raises((ChannelError, RuleError)):
        render_template(tpl, **{**CTX, "profile": {}})
    assert render_template("{{ ctx.today }}", **{**CTX, "profile": {}}) == "2026-11-24"
