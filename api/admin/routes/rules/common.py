"""What the rule pages share: the router they all register on, the rule service,
today, the audit log, a rule's status, the preview sample, optional RuleService calls."""

from __future__ import annotations

from datetime import date
from typing import Any

import orjson
from fastapi import APIRouter, HTTPException, Request

from api.admin.forms import parse_profile
from base.errors import KvadrupelError, RuleValidationError
from catalogue.service import RuleService
from rules.models import RuleIn

router = APIRouter()  # every page of the rules area (api.admin.routes.rules.router)

SPARK_RUNS = 30
LOOKAHEAD_DAYS = 365
DATE_NOTE = "this rule's answer depends on today's date"


def rule_service(request: Request) -> RuleService:
    svc: RuleService = request.app.state.services.rules
    return svc


def today(request: Request) -> date:
    day: date = request.app.state.today()
    return day


def audit(request: Request, user: dict[str, Any], action: str, key: str, **detail: Any) -> None:
    request.app.state.audit.record(
        user["username"], action, f"rule:{key}", orjson.loads(orjson.dumps(detail, default=str))
    )


def rule_in(rule: dict[str, Any], **overrides: Any) -> RuleIn:
    return RuleIn.model_validate({k: rule[k] for k in RuleIn.model_fields if k in rule} | overrides)


def is_live(rule: dict[str, Any]) -> bool:
    return bool(rule["enabled"]) and rule["status"] == "active"


def status_of(rule: dict[str, Any], ever_live: set[str]) -> str:
    if rule["status"] == "quarantined":
        return "quarantined"
    if is_live(rule):
        return "active"
    return "paused" if rule["key"] in ever_live else "draft"


def ever_live_keys(request: Request) -> set[str]:
    """Rules that were live once: approved at some time, or paused."""
    st = request.app.state
    keys: set[str] = st.activations.ever_approved()
    keys |= {
        e["target"].split(":", 1)[1]
        for e in st.audit.list(limit=1000)
        if e["action"] == "rule.pause" and e["target"]
    }
    return keys


def sample_setting(request: Request, text: str | None) -> int | str:
    """Users to sample for previews: a number from the form, ``"all"``, or the default."""
    text = (text or "").strip().lower()
    if text == "all":
        return "all"
    if text.isdigit() and int(text) > 0:
        return min(int(text), 10_000_000)
    default: int = request.app.state.settings.admin_preview_sample
    return default if default > 0 else "all"


def form_date(text: Any, default: date) -> date:
    try:
        return date.fromisoformat(str(text)) if text else default
    except ValueError:
        raise HTTPException(422, f"not a date (YYYY-MM-DD): {str(text)[:40]!r}") from None


def call_optional(request: Request, method: str, *args: Any,
                  **kwargs: Any) -> tuple[Any, str | None]:
    """Call an optional RuleService method: ``(result, None)`` or ``(None, why not)``."""
    fn = getattr(rule_service(request), method, None)
    if fn is None:
        return None, f"{method} is not available in this version of the rule service"
    try:
        return fn(*args, **kwargs), None
    except RuleValidationError as exc:
        return None, "; ".join(str(p["message"]) for p in exc.problems)
    except (KvadrupelError, RuntimeError, ValueError) as exc:
        return None, str(exc) or type(exc).__name__


def runs_oldest_first(request: Request, n: int = SPARK_RUNS) -> list[dict[str, Any]]:
    return list(reversed(request.app.state.services.runs.list(limit=n)))


def load_profile(
    request: Request, user_id: str, profile_text: str
) -> tuple[dict[str, Any] | None, str, str | None]:
    """A profile from a user id (read from its shard) or pasted JSON."""
    user_id = user_id.strip()
    if user_id:
        if not user_id.isdigit() or not 0 < int(user_id) < 2**63:
            return None, "", "user id: a positive whole number"
        uid = int(user_id)
        doc = request.app.state.services.shards.for_user(uid).get_profile(uid)
        if doc is None:
            return None, "", f"no profile for user {uid}"
        return doc, f"user {uid}", None
    profile, err = parse_profile(profile_text)
    return profile, "pasted profile", err
