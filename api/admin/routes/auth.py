"""Sign in and out."""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from api.admin.app import base_url, redirect, render
from api.admin.security import CsrfForm, SignedIn

router = APIRouter()


def _safe_next(request: Request, nxt: str | None) -> str:
    """Only paths inside the admin UI (no scheme, no ``//host``, no backslashes)."""
    base = base_url(request)
    if (
        nxt
        and nxt.startswith(base + "/")
        and not nxt.startswith("//")
        and "\\" not in nxt
        and "://" not in nxt
        and not nxt.startswith(base + "/login")
    ):
        return nxt
    return base + "/"


@router.get("/login")
def login_page(request: Request, next: str | None = None) -> Response:  # noqa: A002
    accounts = request.app.state.accounts
    return render(
        request,
        "login.html",
        next=_safe_next(request, next),
        no_accounts=accounts.count() == 0,
        error=None,
        username="",
    )


@router.post("/login")
async def login(
    request: Request,
    form: CsrfForm,
) -> Response:
    st = request.app.state
    username = str(form.get("username") or "").strip()[:64]
    password = str(form.get("password") or "")[:1024]
    nxt = _safe_next(request, str(form.get("next") or ""))
    wait = st.throttle.blocked_for(username)
    if wait > 0:
        st.audit.record(username or "?", "auth.throttled", f"user:{username}", {})
        return render(
            request,
            "login.html",
            429,
            next=nxt,
            no_accounts=False,
            username=username,
            error=f"Too many failed attempts. Try again in {int(wait) + 1} s.",
        )
    user: dict[str, Any] | None = await run_in_threadpool(
        st.accounts.authenticate, username, password
    )
    if user is None:
        st.throttle.failed(username)
        await run_in_threadpool(
            st.audit.record, username or "?", "auth.failed", f"user:{username}", {}
        )
        return render(
            request,
            "login.html",
            401,
            next=nxt,
            no_accounts=False,
            username=username,
            error="Wrong user name or password (or the account is disabled).",
        )
    st.throttle.succeeded(username)
    # A fresh session: new CSRF token, nothing carried over from before sign-in.
    request.session.clear()
    request.session.update(
        {"u": user["username"], "g": user["session_gen"], "csrf": secrets.token_urlsafe(32)}
    )
    await run_in_threadpool(st.audit.record, user["username"], "auth.login", f"user:{username}", {})
    return Response(status_code=303, headers={"location": nxt})


@router.post("/logout")
def logout(
    request: Request,
    form: CsrfForm,
    user: SignedIn,
) -> Response:
    request.app.state.audit.record(user["username"], "auth.logout", f"user:{user['username']}", {})
    request.session.clear()
    return redirect(request, "/login")
