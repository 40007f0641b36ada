"""The rule editor's form <-> :class:`rules.models.RuleIn`.

The form posts flat fields (``banner_title``, ``email_subject``...) and the
examples table as parallel lists (``ex_name``, ``ex_as_of``, ``ex_expect``,
``ex_profile``). Parsing never raises: it returns what it could read plus the
problems, in the same shape as :meth:`RuleService.validate` gives them, so one
template shows both.
"""

from __future__ import annotations

from datetime import date
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.datastructures import FormData

from rules.models import RuleIn

__all__ = ["editor_values", "parse_profile", "rule_from_form"]

MAX_PROFILE_CHARS = 256 * 1024


def _s(form: FormData, name: str) -> str:
    v = form.get(name)
    return v if isinstance(v, str) else ""


def _problem(field: str, message: str, line: int | None = None) -> dict[str, Any]:
    return {"field": field, "line": line, "message": message}


def parse_profile(text: str, field: str = "profile") -> tuple[dict[str, Any] | None, str | None]:
    """A JSON object from a textarea, or an error message."""
    if len(text) > MAX_PROFILE_CHARS:
        return None, f"{field}: larger than {MAX_PROFILE_CHARS // 1024} KiB"
    try:
        value = orjson.loads(text or "{}")
    except orjson.JSONDecodeError as exc:
        return None, f"{field}: not valid JSON ({exc})"
    if not isinstance(value, dict):
        return None, f"{field}: must be a JSON object ({{...}})"
    return value, None


def _spec(form: FormData, prefix: str, fields: tuple[str, ...]) -> dict[str, str] | None:
    values = {f: _s(form, f"{prefix}_{f}").replace("\r\n", "\n") for f in fields}
    return values if any(v.strip() for v in values.values()) else None


def rule_from_form(
    form: FormData, key: str | None = None
) -> tuple[dict[str, Any], RuleIn | None, list[dict[str, Any]]]:
    """``(values for re-display, RuleIn or None, problems)``. The rule is saved disabled:
    going live is a separate step (activation)."""
    problems: list[dict[str, Any]] = []
    values: dict[str, Any] = {
        "key": key if key is not None else _s(form, "key").strip(),
        "name": _s(form, "name").strip(),
        "group": _s(form, "group").strip() or None,
        "priority": _s(form, "priority").strip() or "100",
        "source": _s(form, "source").replace("\r\n", "\n"),
        "banner": _spec(form, "banner", ("title", "body", "link")),
        "email": _spec(form, "email", ("subject", "text", "html")),
    }
    if values["email"] is not None and not values["email"]["html"].strip():
        values["email"]["html"] = None
    examples_view = []
    examples = []
    names, as_ofs = form.getlist("ex_name"), form.getlist("ex_as_of")
    expects, profiles = form.getlist("ex_expect"), form.getlist("ex_profile")
    for i in range(max(len(names), len(as_ofs), len(expects), len(profiles))):
        name = str(names[i]).strip() if i < len(names) else ""
        as_of = str(as_ofs[i]).strip() if i < len(as_ofs) else ""
        expect = (str(expects[i]) if i < len(expects) else "true") == "true"
        ptext = str(profiles[i]) if i < len(profiles) else ""
        examples_view.append(
            {"name": name, "as_of": as_of, "expect": expect, "profile_json": ptext}
        )
        if not (name or ptext.strip()):
            continue  # an empty row added and left blank
        label = f"example {i + 1}" + (f" ({name})" if name else "")
        profile, err = parse_profile(ptext, label + " profile")
        if err:
            problems.append(_problem(f"examples.{i}", err))
            continue
        try:
            day = date.fromisoformat(as_of)
        except ValueError:
            problems.append(
                _problem(f"examples.{i}", f"{label}: as-of must be a date (YYYY-MM-DD)")
            )
            continue
        examples.append(
            {
                "name": name or f"example {i + 1}",
                "profile": profile,
                "as_of": day.isoformat(),
                "expect": expect,
            }
        )
    values["examples"] = examples_view
    try:
        priority = int(values["priority"])
    except ValueError:
        problems.append(_problem("priority", "priority must be a whole number"))
        priority = 100
    data = {k: values[k] for k in ("key", "name", "group", "source", "banner", "email")}
    data |= {"priority": priority, "examples": examples, "enabled": False}
    rule = None
    try:
        rule = RuleIn.model_validate(data)
    except ValidationError as exc:
        for e in exc.errors():
            loc = ".".join(str(p) for p in e.get("loc", ()))
            problems.append(_problem(loc or "rule", f"{loc}: {e.get('msg')}"))
    return values, (rule if not problems else None), problems


def editor_values(rule: dict[str, Any] | None) -> dict[str, Any]:
    """A saved rule (``RuleService.get``) as the editor's form values."""
    if rule is None:
        return {
            "key": "",
            "name": "",
            "group": None,
            "priority": 100,
            "source": "def match(profile, ctx):\n    return False\n",
            "banner": None,
            "email": None,
            "examples": [],
        }
    return {
        "key": rule["key"],
        "name": rule["name"],
        "group": rule.get("group"),
        "priority": rule.get("priority", 100),
        "source": rule["source"],
        "banner": rule.get("banner"),
        "email": rule.get("email"),
        "examples": [
            {
                "name": e.get("name", ""),
                "as_of": str(e.get("as_of", "")),
                "expect": bool(e.get("expect")),
                "profile_json": orjson.dumps(
                    e.get("profile", {}), option=orjson.OPT_INDENT_2
                ).decode(),
            }
            for e in rule.get("examples") or []
        ],
    }
