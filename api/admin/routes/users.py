"""Accounts (admin), the audit log (approvers and admins), settings (admin)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response

from api.admin.pages import flash, redirect, render
from api.admin.security import Admin, Approver, CsrfForm
from api.admin.store import ROLES
from base.errors import Conflict

router = APIRouter()

SHOWN_SETTINGS = (
    "timezone",
    "rule_budget_ms",
    "rule_error_rate_quarantine",
    "nightly_cron",
    "range_target_users",
    "admin_approval_audience",
    "admin_preview_sample",
    "admin_session_max_age_s",
    "admin_cookie_secure",
    "admin_trusted_proxies",
    "banner_link_schemes",
    "embedded_shards",
)


def _record(request: Request, user: dict[str, Any], action: str, name: str, **detail: Any) -> None:
    request.app.state.audit.record(user["username"], action, f"user:{name}", detail)


@router.get("/users")
def users_page(
    request: Request,
    user: Admin,
) -> Response:
    return render(
        request, "users.html", users=request.app.state.accounts.list(), roles=ROLES, error=None
    )


@router.post("/users")
def add_user(
    request: Request,
    form: CsrfForm,
    user: Admin,
) -> Response:
    accounts = request.app.state.accounts
    name, role = str(form.get("username") or ""), str(form.get("role") or "")
    try:
        created = accounts.add(name, str(form.get("password") or ""), role)
    except (ValueError, Conflict) as exc:
        return render(
            request, "users.html", 422, users=accounts.list(), roles=ROLES, error=str(exc)
        )
    _record(request, user, "user.add", created["username"], role=role)
    flash(request, f"Added {created['username']} ({role}).")
    return redirect(request, "/users")


@router.post("/users/{name}")
def change_user(
    name: str,
    request: Request,
    form: CsrfForm,
    user: Admin,
) -> Response:
    accounts = request.app.state.accounts
    before = accounts.get(name)
    action = str(form.get("action") or "")
    try:
        if action == "role":
            role = str(form.get("role") or "")
            if name == user["username"] and role != "admin":
                raise ValueError("you cannot take the admin role from yourself")
            accounts.set_role(name, role)
            _record(request, user, "user.role", name, role={"from": before["role"], "to": role})
        elif action == "password":
            accounts.set_password(name, str(form.get("password") or ""))
            _record(request, user, "user.password", name)
        elif action in ("disable", "enable"):
            if name == user["username"]:
                raise ValueError("you cannot disable yourself")
            accounts.set_active(name, action == "enable")
            _record(request, user, f"user.{action}", name)
        else:
            raise HTTPException(422, "unknown action")
    except ValueError as exc:
        return render(
            request, "users.html", 422, users=accounts.list(), roles=ROLES, error=str(exc)
        )
    flash(request, f"Updated {name}.")
    return redirect(request, "/users")


@router.get("/audit")
def audit_page(request: Request, user: Approver, target: str | None = None) -> Response:
    entries = request.app.state.audit.list(target=target or None, limit=300)
    return render(request, "audit.html", entries=entries, target=target or "")


@router.get("/settings")
def settings_page(
    request: Request,
    user: Admin,
) -> Response:
    s = request.app.state.settings
    return render(
        request,
        "settings.html",
        shown=[(k, getattr(s, k)) for k in SHOWN_SETTINGS if hasattr(s, k)],
    )
