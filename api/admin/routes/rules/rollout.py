"""Canary rollout from the launch page: roll the current version out to a share of
the users, change the share, promote it to everyone or roll it back.

The same approval rules as activation: only an approver acts, and starting a canary
needs an approver who did not write the version. Every action is written to the
audit log by the rule service (actor: the approver), and ends on the launch page.
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import Response

from api.admin.pages import flash, redirect
from api.admin.routes.rules.common import router, rule_service
from api.admin.security import Approver, CsrfForm
from base.errors import Conflict, RuleValidationError
from catalogue.service import check_rollout


def _back(request: Request, key: str, message: str, level: str = "ok") -> Response:
    flash(request, message, level)
    return redirect(request, f"/rules/{key}/launch")


def _words(rule: dict[str, Any]) -> str:
    if rule["rollout"] is None:
        return f"{rule['key']} v{rule['version']} is live for everyone."
    return (f"{rule['key']} v{rule['version']} is live for {rule['rollout']} % of the users; "
            f"the others stay on v{rule['rollout_from']}.")


def _int(form: Any, name: str) -> int | None:
    raw = str(form.get(name) or "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise HTTPException(422, f"{name} must be a whole number, not {raw!r}") from None


@router.post("/rules/{key}/rollout")
def rollout(key: str, request: Request, form: CsrfForm, user: Approver) -> Response:
    svc = rule_service(request)
    rule = svc.get(key)
    try:
        percent = check_rollout(_int(form, "percent"))
    except ValueError as exc:
        return _back(request, key, str(exc), "error")
    if rule["rollout"] is None:
        author = next((v.get("author") for v in svc.versions(key)
                       if v["version"] == rule["version"]), None)
        if author == user["username"]:
            raise HTTPException(
                403, f"you wrote version {rule['version']}: another approver must roll it out")
    try:
        rule = svc.rollout(key, percent, user["username"], _int(form, "from_version"))
    except (Conflict, RuleValidationError) as exc:
        return _back(request, key, "Cannot roll out: " + str(exc), "error")
    return _back(request, key, _words(rule))


@router.post("/rules/{key}/promote")
def promote(key: str, request: Request, form: CsrfForm, user: Approver) -> Response:
    try:
        rule = rule_service(request).promote(key, user["username"])
    except Conflict as exc:
        return _back(request, key, str(exc), "error")
    return _back(request, key, "Promoted: " + _words(rule))


@router.post("/rules/{key}/rollback")
def rollback(key: str, request: Request, form: CsrfForm, user: Approver) -> Response:
    try:
        rule = rule_service(request).rollback(key, user["username"])
    except Conflict as exc:
        return _back(request, key, str(exc), "error")
    return _back(request, key, "Rolled back: " + _words(rule), "info")
