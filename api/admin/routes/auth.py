"""Sign in and out."""

from __future__ import annotations

import re
import secrets
from typing import Any
from urllib.parse import unquote

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from api.admin.pages import base_url, redirect, render
from api.admin.security import CsrfForm, SignedIn

router = APIRouter()

# A path (and query) of RFC 3986 characters only: no controls, spaces, backslashes,
# quotes or angle brackets, no fragment.
_SAFE_PATH = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@%/?]*")


def _safe_next(request: Request, nxt: str | None) -> str:
    """Where to go after signing in: a same-site path inside the admin UI (no scheme,
    no ``//host``, no backslash, no control characters, no ``.``/``..`` segment, not
    the sign-in page); anything else gives the UI's start page."""
    base = base_url(request)
    default = base + "/"
    if not nxt or len(nxt) > 2000 or not _SAFE_PATH.fullmatch(nxt):
        return default
    path = nxt.split("?", 1)[0]
    if not path.startswith(base + "/") or path.startswith("//"):
        return default
    decoded = unquote(path)
    segments = decoded[len(base) + 1 :].split("/")
    if (
        any(seg in (".", "..") for seg in segments)
        or "\\" in decoded
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded)
        or segments[0] == "login"
    ):
        return default
    return nxt


def _login_page(request: Request, status: int, nxt: str, username: str, error: str) -> Response:
    return render(
        request, "login.html", status, next=nxt, no_accounts=False, username=username, error=error
    )


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
    address = st.client_address(request)
    # Counted as a failure before the password is checked (concurrent guesses cannot
    # slip past the limits); a right password takes it back.
    wait = st.throttle.attempt(address, username)
    if wait is not None:
        await run_in_threadpool(
            st.audit.record, username or "?", "auth.throttled", f"user:{username}",
            {"address": address, "reason": wait.reason},
        )
        who = "from your address" if wait.reason == "address" else "for this account"
        return _login_page(
            request, 429, nxt, username,
            f"Too many failed sign-ins {who}. Try again in {int(wait.seconds) + 1} s.",
        )
    user: dict[str, Any] | None = await run_in_threadpool(
        st.accounts.authenticate, username, password
    )
    if user is None:
        await run_in_threadpool(
            st.audit.record, username or "?", "auth.failed", f"user:{username}",
            {"address": address},
        )
        return _login_page(
            request, 401, nxt, username,
            "Wrong user name or password (or the account is disabled).",
        )
    st.throttle.succeeded(address, username)
    # A fresh session: new CSRF token, nothing carried over from before sign-in.
    request.session.clear()
    request.session.update(
        {"u": user["username"], "g": user["session_gen"], "csrf": secrets.token_urlsafe(32)}
    )
    await run_in_threadpool(
        st.audit.record, user["username"], "auth.login", f"user:{username}", {"address": address}
    )
    return Response(status_code=303, headers={"location": nxt})


@router.post("/logout")
def logout(
    request: Request,
    form: CsrfForm,
    user: SignedIn,
) -> Response:
    # Server-side: the account's session generation moves on, so this cookie (and any
    # copy of it, and the account's other sessions) is refused from now on.
    request.app.state.accounts.end_sessions(user["username"])
    request.app.state.audit.record(user["username"], "auth.logout", f"user:{user['username']}", {})
    request.session.clear()
    return redirect(request, "/login")
