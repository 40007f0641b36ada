"""The content of an enter: the why-data (rules/why.py) and localisation
(engine/evaluate/compose.py), and the rule-spec extensions they read."""

from __future__ import annotations

import copy
import time
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from engine.evaluate.compose import compose, device_tokens, language_of, timezone_of
from rules.context import make_context
from rules.models import BannerSpec, EmailSpec, RuleIn
from rules.templates import validate_template
from rules.why import explain

CTX = make_context("2026-11-24")
PROFILE: dict[str, Any] = {
    "name": "Ann", "email": "ann@example.org", "language": "pt-BR", "timezone": "Asia/Vladivostok",
    "driver_license": {"expires_on": "2026-12-10", "number": "77 12"},
    "orders": {"recent": [{"id": 1, "sum": 10}, {"id": 2, "sum": 30}], "tags": ["a", "b"]},
    "devices": {"phone": {"push_token": "tok-1"}, "bad id!": {"push_token": "tok-2"},
                "tablet": {"platform": "ios"}},
}


def _explain(source: str, profile: Any = None) -> dict[str, Any]:
    return explain("t", 1, source, PROFILE if profile is None else profile, CTX, 50.0)


def test_why_reports_the_leaves_read_with_their_values() -> None:
    got = _explain('''
def match(profile, ctx):
    left = days_until(get(profile, "driver_license.expires_on"), ctx)
    total = 0
    for o in profile.get("orders", {}).get("recent", []):
        total += o["sum"]
    return left is not None and left < 30 and total > 20 and "email" in profile \\
        and not has(profile, "vehicle.plate") and len(profile["orders"]["tags"]) == 2
''')
    assert got == {"matched": True, "missing": ["vehicle"], "fields": {
        "driver_license.expires_on": "2026-12-10", "email": "ann@example.org",
        "orders.recent.0.sum": 10, "orders.recent.1.sum": 30, "orders.tags": ["a", "b"]}}


def test_why_cannot_change_the_profile_and_fails_like_the_sandbox() -> None:
    before = repr(PROFILE)
    got = _explain('''
def match(profile, ctx):
    profile["orders"]["tags"].append("x")
    return True
''')
    assert got["error"].startswith("RuleRuntimeError: the profile is read-only")
    got = _explain('''
def match(profile, ctx):
    d = dict(profile["driver_license"])
    d["number"] = "changed"
    return d["number"] == "changed"
''')
    assert got["matched"] is True and got["fields"] == {"driver_license.expires_on": "2026-12-10",
                                                         "driver_license.number": "77 12"}
    assert repr(PROFILE) == before


def test_why_is_bounded_and_never_raises() -> None:
    big = {"blob": "x" * 10_000, **{f"k{i}": i for i in range(200)}}
    got = _explain('''
def match(profile, ctx):
    return len(profile["blob"]) > 0 and sum(profile[k] for k in profile if k != "blob") > 0
''', big)
    assert len(got["fields"]) == 64
    assert len(got["fields"]["blob"]) == 300 and got["fields"]["blob"].endswith("…")
    loop = _explain('''
def match(profile, ctx):
    n = 0
    while True:
        n += 1
''')
    assert "budget" in loop["error"]
    assert _explain("def match(profile, ctx) return 1")["error"].startswith("RuleCompileError")


class _Rule:
    def __init__(self, banner: Any = None, email: Any = None) -> None:
        self.key, self.version, self.budget_ms = "dl", 4, 50.0
        self.source = (
            'def match(p, ctx):\n    return get(p, "driver_license.expires_on") is not None\n'
        )
        self.banner, self.email = banner, email


def test_compose_localises_with_fallbacks_and_records_the_language() -> None:
    banner = BannerSpec.model_validate(
        {
            "title": "Права до {{ profile.driver_license.expires_on }}",
            "body": "RU body",
            "link": "/ru",
            "translations": {
                "pt": {"title": "Carteira até {{ profile.driver_license.expires_on }}"},
                "en": {"title": "Licence", "body": "EN body"},
            },
            "expires_at": "{{ profile.driver_license.expires_on }}",
            "push": {"body": "Olá {{ profile.name }}"},
            "category": "documents",
        }
    ).model_dump()
    email = EmailSpec.model_validate({
        "subject": "RU", "text": "RU text", "importance": "critical",
        "translations": {"pt-br": {"subject": "PT-BR"}}}).model_dump()
    b, e, extra = compose(_Rule(banner, email), PROFILE, CTX)
    # pt-BR → no pt-br banner translation → pt; the body falls back to the spec's own
    assert b == {"title": "Carteira até 2026-12-10", "body": "RU body", "link": "/ru",
                 "category": "documents", "critical": False,
                 "expires_at": "2026-12-10T13:59:59+00:00"}  # end of the day in Vladivostok
    assert e == {"subject": "PT-BR", "text": "RU text", "category": "general", "critical": True}
    assert extra["lang"] == "pt" and extra["user_lang"] == "pt-br"
    assert extra["tz"] == "Asia/Vladivostok"
    assert extra["push"] == {
        "title": "Carteira até 2026-12-10",
        "body": "Olá Ann",
        "link": "/ru",
        "category": "documents",
        "critical": False,
        "tokens": {"phone": "tok-1"},
    }
    assert extra["why"] == {"fields": {"driver_license.expires_on": "2026-12-10"}, "missing": [],
                            "matched": True}
    b, e, extra = compose(_Rule(banner, None), {**PROFILE, "language": "de", "devices": {}}, CTX)
    assert b["title"] == "Права до 2026-12-10" and extra["lang"] is None and extra["push"] is None


def test_profile_conventions() -> None:
    assert language_of({"locale": "en_US"}) == "en-us"
    assert language_of({"language": "<script>"}) is None
    assert timezone_of({"timezone": "Mars/Olympus"}) is None
    assert timezone_of({"timezone": "Europe/Lisbon"}) == "Europe/Lisbon"
    assert device_tokens(PROFILE) == {"phone": "tok-1"}


def test_spec_extensions_are_compatible_and_validated() -> None:
    plain = {"title": "t", "body": "", "link": ""}
    assert BannerSpec.model_validate(plain).model_dump() == plain  # stored as before
    with pytest.raises(ValidationError):
        BannerSpec.model_validate(plain | {"translations": {"not a language": {"title": "x"}}})
    with pytest.raises(ValidationError):
        EmailSpec.model_validate({"subject": "s", "text": "t", "importance": "urgent"})
    with pytest.raises(ValidationError):
        BannerSpec.model_validate(plain | {"category": "Has Spaces"})
    rule = RuleIn.model_validate(
        {
            "key": "k",
            "name": "n",
            "source": "def match(p, c):\n    return 1\n",
            "banner": plain | {"translations": {"en": {"title": "{% if %}"}}},
        }
    )
    assert validate_template(rule.banner.model_dump()["translations"]) == (
        "en: title: line 1: Expected an expression, got 'end of statement block'")
    assert validate_template({"title": "ok", "body": None}) is None


TAMPER = """
def match(profile, ctx):
    d = dict.get(profile, "devices")
    for k in d:
        d[k]["push_token"] = "ATTACKER-TOKEN"
    dict.get(profile, "orders").setdefault("x", 1)
    return True
"""


def test_why_rerun_cannot_redirect_the_next_push() -> None:
    # Given a user's profile, a rule entering with a tampering source, and another
    # rule whose banner asks for a push
    profile = copy.deepcopy(PROFILE)
    before = orjson.dumps(profile)
    tamper = _Rule({"title": "t", "body": "b", "link": "/"})
    tamper.key, tamper.source = "tamper", TAMPER
    pusher = _Rule({"title": "t", "body": "b", "link": "/", "push": {"body": "hi"}})

    # When both enter for the user, the tampering one first (its why-data is a re-run)
    _, _, first = compose(tamper, profile, CTX)
    _, _, second = compose(pusher, profile, CTX)

    # Then the re-run was refused like in the evaluation, the profile's bytes are
    # unchanged, and the push goes to the user's own token
    assert first["why"]["error"].startswith("RuleRuntimeError: the profile is read-only")
    assert orjson.dumps(profile) == before
    assert second["push"]["tokens"] == {"phone": "tok-1"}


def test_why_rerun_timeouts_are_reported_for_counting() -> None:
    # Given a rule that loops only on the why path, its budget unset (compose uses 50 ms)
    rule = _Rule({"title": "t", "body": "b", "link": "/"})
    rule.budget_ms = 0
    rule.source = (
        "def match(profile, ctx):\n    if isinstance(profile.values(), list):\n"
        "        while True:\n            pass\n    return True\n"
    )

    # When it enters / Then the why re-run is stopped and says it timed out
    start = time.perf_counter()
    _, _, extra = compose(rule, PROFILE, CTX)
    assert time.perf_counter() - start < 2.0
    assert extra["why"]["timeout"] is True and "budget" in extra["why"]["error"]
