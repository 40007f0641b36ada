"""What a rule's *enter* carries to the channels: localised content, the why-data.

Called by the evaluator (engine/evaluate/evaluation.py) once per enter, never on the
nightly path of users whose state did not change. :func:`compose` returns

* ``banner``: ``{title, body, link}`` rendered in the user's language, plus
  ``category``, ``critical`` and, when the spec has one, ``expires_at`` (ISO,
  UTC); or None;
* ``email``: ``{subject, text, html}`` likewise, plus ``category``/``critical``;
* ``extra``, merged into the result message: ``lang`` (the translation used, or
  None for the spec's own texts), ``tz`` (the user's time zone when the profile
  names a valid one), ``why`` (:func:`rules.why.explain`: the profile fields the
  rule read, with their values) and ``push`` (title/body/link + the user's device
  tokens, when the banner asks for a push and the user has a device).

The why-data re-runs the rule in the same sandbox as the evaluation (read-only
profile, CPU budget), so it cannot change what later enters see. It never
raises: a re-run that failed has ``why["error"]`` (and ``why["timeout"] is True``
when the budget stopped it), which the evaluator can count like a rule error.

Localisation: a spec may carry ``translations: {"en": {...}, "pt-BR": {...}}``;
each entry overrides some of the spec's keys. The user's language is the
profile's ``language`` (or ``lang``/``locale``): ``pt-BR`` tries ``pt-br``, then
``pt``; without a match the spec's own texts are used (the fallback).

Profile conventions read here: ``language``, ``timezone`` (IANA name), and
``devices.<device id>.push_token`` for push (a device id is a path segment:
letters, digits, ``_``, ``-``), so an unregistered token can be removed with an
ordinary ``unset`` event.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, date, datetime, time
from functools import lru_cache
from typing import Any, overload
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from base.errors import ChannelError
from channels.variants import content_of
from rules.models import link_problem
from rules.templates import render_content, render_template
from rules.why import explain

__all__ = ["BANNER_KEYS", "EMAIL_KEYS", "PUSH_KEYS", "compose", "device_tokens",
           "language_of", "localised", "timezone_of"]

BANNER_KEYS = ("title", "body", "link")
EMAIL_KEYS = ("subject", "text", "html")
PUSH_KEYS = ("title", "body", "link")
_LANG_RE = re.compile(r"[a-z]{2,3}(-[a-z0-9]{1,8})*")
_DEVICE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,127}")
MAX_DEVICES = 20


def language_of(profile: Any) -> str | None:
    """The user's language tag, lower-case with ``-`` (``"pt-br"``), or None."""
    if not isinstance(profile, Mapping):
        return None
    for key in ("language", "lang", "locale"):
        value = profile.get(key)
        if isinstance(value, str) and value:
            tag = value.strip().replace("_", "-").lower()
            if _LANG_RE.fullmatch(tag):
                return tag
    return None


@lru_cache(maxsize=512)
def _zone_ok(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def timezone_of(profile: Any) -> str | None:
    """The profile's ``timezone`` when it is a valid IANA name, else None."""
    if not isinstance(profile, Mapping):
        return None
    value = profile.get("timezone") or profile.get("tz")
    if isinstance(value, str) and 0 < len(value) <= 64 and _zone_ok(value):
        return value
    return None


def _pick(translations: Any, lang: str | None) -> tuple[str | None, Mapping[str, Any] | None]:
    if not lang or not isinstance(translations, Mapping) or not translations:
        return None, None
    lowered = {str(k).replace("_", "-").lower(): (k, v) for k, v in translations.items()}
    candidates = [lang]
    while "-" in candidates[-1]:
        candidates.append(candidates[-1].rsplit("-", 1)[0])
    for c in candidates:
        hit = lowered.get(c)
        if hit is not None and isinstance(hit[1], Mapping):
            return str(hit[0]), hit[1]
    return None, None


@overload
def localised(spec: Mapping[str, Any], keys: tuple[str, ...],
              lang: str | None) -> tuple[dict[str, Any], str | None]: ...
@overload
def localised(spec: Mapping[str, Any] | None, keys: tuple[str, ...],
              lang: str | None) -> tuple[dict[str, Any] | None, str | None]: ...
def localised(spec: Mapping[str, Any] | None, keys: tuple[str, ...],
              lang: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """The spec's ``keys`` in ``lang`` (translation over the spec's own texts) and
    the translation used (None: the spec's own)."""
    if spec is None:
        return None, None
    texts = {k: spec.get(k) for k in keys if spec.get(k) is not None}
    used, tr = _pick(spec.get("translations"), lang)
    if tr is not None:
        texts.update({k: v for k, v in tr.items() if k in keys and v is not None})
    return texts, used


def device_tokens(profile: Any) -> dict[str, str]:
    """``{device id: push token}`` from ``profile.devices``."""
    devices = profile.get("devices") if isinstance(profile, Mapping) else None
    out: dict[str, str] = {}
    if isinstance(devices, Mapping):
        for dev, info in devices.items():
            if not (
                isinstance(dev, str) and _DEVICE_RE.fullmatch(dev) and isinstance(info, Mapping)
            ):
                continue
            token = info.get("push_token")
            if isinstance(token, str) and 0 < len(token) <= 4096:
                out[dev] = token
                if len(out) >= MAX_DEVICES:
                    break
    return out


def _flags(spec: Mapping[str, Any]) -> dict[str, Any]:
    category = spec.get("category")
    return {"category": category if isinstance(category, str) and category else "general",
            "critical": spec.get("importance") == "critical"}


def _expiry(source: Any, profile: Any, ctx: Any, tz: str) -> str | None:
    """Render an ``expires_at`` template to an ISO UTC datetime (a date means the
    end of that day in ``tz``); None when empty or not a date."""
    if not isinstance(source, str) or not source.strip():
        return None
    text = render_template(source, **{**(ctx or {}), "profile": profile}).strip()
    if not text:
        return None
    try:
        if len(text) == 10:
            d = date.fromisoformat(text)
            at = datetime.combine(d, time(23, 59, 59), ZoneInfo(tz))
        else:
            at = datetime.fromisoformat(text.replace("Z", "+00:00"))
            if at.tzinfo is None:
                at = at.replace(tzinfo=ZoneInfo(tz))
    except ValueError:
        return None
    return at.astimezone(UTC).isoformat()


def _zone_of(ctx: Any) -> str:
    """The evaluation's time zone (``ctx.tz``), UTC for a context without one."""
    zone: str = getattr(ctx, "tz", "UTC")
    return zone


def _check_link(link: Any, what: str) -> None:
    """A link's scheme is judged again once rendered: the template check at save time
    cannot see a scheme that comes from the profile (``{{ profile.url }}``)."""
    if isinstance(link, str) and link:
        problem = link_problem(link, template=False)
        if problem:
            raise ChannelError(f"{what} as rendered: {problem}")


def compose(
    rule: Any, profile: Any, ctx: Any, user_id: int | None = None
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, dict[str, Any]]:
    """``(banner, email, extra)`` for an enter of ``rule`` (an ``ActiveRule``) on
    ``profile`` of ``user_id`` (whose content variant, channels/variants.py, is
    rendered; ``extra["variant"]`` names it). Raises :class:`~base.errors.ChannelError`
    for a template that fails; the why-data never raises."""
    lang = language_of(profile)
    tz = timezone_of(profile)
    banner = email = push = None
    used: str | None = None
    bspec, espec, variant = content_of(rule, user_id)
    if bspec is not None:
        texts, used = localised(bspec, BANNER_KEYS, lang)
        banner = render_content(texts, profile, ctx) | _flags(bspec)
        _check_link(banner.get("link"), "banner link")
        expires = _expiry(bspec.get("expires_at"), profile, ctx, tz or _zone_of(ctx))
        if expires:
            banner["expires_at"] = expires
        pspec = bspec.get("push")
        if isinstance(pspec, Mapping):
            tokens = device_tokens(profile)
            if tokens:
                ptexts, _ = localised(pspec, PUSH_KEYS, lang)
                rendered = render_content(ptexts, profile, ctx) or {}
                push = {k: rendered.get(k) or banner.get(k, "") for k in PUSH_KEYS}
                _check_link(push.get("link"), "push link")
                own = {k: v for k, v in pspec.items() if k in ("category", "importance") and v}
                push |= _flags({**bspec, **own})
                push["tokens"] = tokens
    if espec is not None:
        texts, used_e = localised(espec, EMAIL_KEYS, lang)
        email = render_content(texts, profile, ctx) | _flags(espec)
        used = used or used_e
    extra: dict[str, Any] = {"lang": used or None, "user_lang": lang, "tz": tz, "push": push,
                             "variant": variant}
    budget = getattr(rule, "budget_ms", None) or 50.0
    extra["why"] = explain(rule.key, rule.version, rule.source, profile, ctx, budget)
    return banner, email, extra
