"""The built-in rule pack (rules/pack.py): shape, examples and templates."""

from __future__ import annotations

import pytest
from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rules.context import make_context
from rules.pack import BUILTIN_RULES
from rules.ruleset import RuleSet, RuleSpec

REQUIRED = {"key", "name", "group", "priority", "source", "banner", "email", "examples"}
EXAMPLES = [(rule, ex) for rule in BUILTIN_RULES for ex in rule["examples"]]


def test_the_pack_has_the_required_rules_in_the_documented_shape() -> None:
    # Given the pack / Then it has the rules the product needs, each complete
    keys = [r["key"] for r in BUILTIN_RULES]
    assert len(set(keys)) == len(keys)
    assert {
        "dl-expiring",
        "dl-expired",
        "dl-renewed",
        "birthday",
        "passport-replace",
        "vehicle-registration-expiring",
    } <= set(keys)
    for rule in BUILTIN_RULES:
        assert set(rule) == REQUIRED, rule["key"]
        assert set(rule["banner"]) == {"title", "body", "link"}
        assert rule["email"] is None or set(rule["email"]) == {"subject", "text", "html"}


def test_driver_licence_rules_share_a_group_with_renewed_over_expired_over_expiring() -> None:
    # Given the licence rules / Then one group, priorities renewed > expired > expiring
    by_key = {r["key"]: r for r in BUILTIN_RULES}
    assert {by_key[k]["group"] for k in ("dl-renewed", "dl-expired", "dl-expiring")} == {
        "driver-license"
    }
    assert (
        by_key["dl-renewed"]["priority"]
        > by_key["dl-expired"]["priority"]
        > by_key["dl-expiring"]["priority"]
    )


def test_every_rule_ships_a_matching_and_a_non_matching_example() -> None:
    # Given each rule's examples / Then there are at least two, of both outcomes
    for rule in BUILTIN_RULES:
        expects = [ex["expect"] for ex in rule["examples"]]
        assert len(expects) >= 2 and True in expects and False in expects, rule["key"]


@pytest.mark.parametrize(
    ("rule", "example"), EXAMPLES, ids=[f"{r['key']}:{e['name']}" for r, e in EXAMPLES]
)
def test_examples_pass(rule: dict, example: dict) -> None:
    # Given a rule and one of its examples
    rules = RuleSet([RuleSpec(rule["key"], 1, rule["source"], rule["priority"], rule["group"])])

    # When the example profile is evaluated on its as-of date
    outcome = rules.evaluate(example["profile"], make_context(example["as_of"]))

    # Then the rule matches exactly when the example says, without error
    assert outcome.errors == {} and outcome.timeouts == []
    assert (rule["key"] in outcome.matched) is example["expect"]


@pytest.mark.parametrize(
    ("rule", "example"),
    [(r, e) for r, e in EXAMPLES if e["expect"]],
    ids=[f"{r['key']}:{e['name']}" for r, e in EXAMPLES if e["expect"]],
)
@pytest.mark.parametrize("language", ["ru", "en"])
def test_templates_render_for_matching_examples(rule: dict, example: dict, language: str) -> None:
    # Given a strict sandboxed Jinja2 environment and a profile the rule matches
    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
    ctx = make_context(example["as_of"])
    profile = {**example["profile"], "language": language}

    # When each banner and e-mail template is rendered with the profile and ctx
    parts = {**rule["banner"], **(rule["email"] or {})}
    rendered = {
        name: env.from_string(text).render(profile=profile, **ctx)
        for name, text in parts.items()
        if text
    }

    # Then everything renders, with no template syntax left over
    assert rendered["title"]
    assert not any("{{" in text or "{%" in text for text in rendered.values())
