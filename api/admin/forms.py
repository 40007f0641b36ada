"""The rule editor's form <-> :class:`rules.models.RuleIn`.

The form posts flat fields (``banner_title``, ``email_subject``,
``banner_push_title``...), translations as JSON objects (``banner_translations``:
``{"de": {"title": ...}}``), and the examples and the content variants as parallel
lists (``ex_name``, ``ex_as_of``, ``ex_expect``, ``ex_profile``; ``var_key``,
``var_weight``, ``var_banner``, ``var_email`` — a variant's banner and e-mail as JSON
objects, every field a rule's banner/e-mail has). A form that edits every content
field says so with ``content_fields=1``: what it posts is then the whole content.
Parsing never raises: it returns what it could read plus the
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


def _json_field(text: str, label: str, problems: list[dict[str, Any]], field: str,
                kind: type = dict) -> Any:
    """A JSON value of ``kind`` from a textarea (blank: None), or None and a problem."""
    if not text.strip():
        return None
    if len(text) > MAX_PROFILE_CHARS:
        problems.append(_problem(field, f"{label}: larger than {MAX_PROFILE_CHARS // 1024} KiB"))
        return None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        problems.append(_problem(field, f"{label}: not valid JSON ({exc})"))
        return None
    if not isinstance(value, kind):
        problems.append(_problem(field, f"{label}: must be a JSON "
                                        f"{'object ({...})' if kind is dict else 'list'}"))
        return None
    return value


def _options(form: FormData, prefix: str, spec: dict[str, Any],
             problems: list[dict[str, Any]], label: str) -> None:
    """The optional fields of a banner/push/e-mail: category, importance, translations."""
    category = _s(form, f"{prefix}_category").strip()
    if category:
        spec["category"] = category
    if _s(form, f"{prefix}_importance") == "critical":
        spec["importance"] = "critical"
    tr = _json_field(_s(form, f"{prefix}_translations"), f"{label} translations", problems,
                     f"{prefix.replace('_', '.')}.translations")
    if tr:
        spec["translations"] = tr


def _content(form: FormData, values: dict[str, Any], problems: list[dict[str, Any]]) -> None:
    """Every content field of the rule's banner (with its push) and e-mail, and the
    variants, into ``values`` (the view) and problems."""
    banner = values["banner"]
    if banner is not None:
        expires = _s(form, "banner_expires_at").strip()
        if expires:
            banner["expires_at"] = expires
        _options(form, "banner", banner, problems, "banner")
        if _s(form, "banner_push_on"):
            push: dict[str, Any] = {
                f: v for f in ("title", "body", "link")
                if (v := _s(form, f"banner_push_{f}").replace("\r\n", "\n").strip())}
            _options(form, "banner_push", push, problems, "push")
            banner["push"] = push
    email = values["email"]
    if email is not None:
        _options(form, "email", email, problems, "e-mail")
    keys, weights = form.getlist("var_key"), form.getlist("var_weight")
    vbanners, vemails = form.getlist("var_banner"), form.getlist("var_email")
    view, variants = [], []
    for i in range(max(len(keys), len(weights), len(vbanners), len(vemails))):
        row = {"key": str(keys[i]).strip() if i < len(keys) else "",
               "weight": str(weights[i]).strip() if i < len(weights) else "",
               "banner_json": str(vbanners[i]) if i < len(vbanners) else "",
               "email_json": str(vemails[i]) if i < len(vemails) else ""}
        view.append(row)
        if not any(x.strip() for x in row.values()):
            continue  # an empty row added and left blank
        label = f"variant {i + 1}" + (f" ({row['key']})" if row["key"] else "")
        var: dict[str, Any] = {"key": row["key"], "weight": row["weight"]}
        try:
            var["weight"] = float(row["weight"])
        except ValueError:
            problems.append(_problem(f"variants.{i}.weight",
                                     f"{label}: the weight must be a number"))
            continue
        for part in ("banner", "email"):
            spec = _json_field(row[f"{part}_json"], f"{label} {part}", problems,
                               f"variants.{i}.{part}")
            if spec is not None:
                var[part] = spec
        variants.append(var)
    values["variants"] = view
    values["variant_specs"] = variants or None


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
    full = bool(_s(form, "content_fields"))
    values["tr"] = {p: _s(form, f"{p}_translations") for p in ("banner", "banner_push", "email")}
    if full:
        _content(form, values, problems)
    try:
        priority = int(values["priority"])
    except ValueError:
        problems.append(_problem("priority", "priority must be a whole number"))
        priority = 100
    data = {k: values[k] for k in ("key", "name", "group", "source", "banner", "email")}
    data |= {"priority": priority, "examples": examples, "enabled": False}
    if full:
        data["variants"] = values["variant_specs"]
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
            "variants": [],
            "tr": {},
        }
    banner = rule.get("banner") or {}
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
        "tr": {
            "banner": _pretty(banner.get("translations")),
            "banner_push": _pretty((banner.get("push") or {}).get("translations")),
            "email": _pretty((rule.get("email") or {}).get("translations")),
        },
        "variants": [
            {
                "key": v.get("key", ""),
                "weight": f"{v.get('weight', 1):g}",
                "banner_json": _pretty(v.get("banner")),
                "email_json": _pretty(v.get("email")),
            }
            for v in rule.get("variants") or []
        ],
    }


def _pretty(value: Any) -> str:
    return "" if value is None else orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()
