"""Who is signed in, what they may do, and CSRF protection.

* **Sessions**: Starlette's ``SessionMiddleware`` keeps ``{"u": user, "g": session
  generation, "csrf": token}`` in a cookie signed with itsdangerous (HttpOnly,
  SameSite=Lax, ``Path=/admin``, Secure behind HTTPS, expiring after
  ``admin_session_max_age_s``). The account is re-read on every request, so a role
  change applies at once and a disabled account or a password change (which bumps
  the generation) ends every session.
* **Roles** are checked here, on the server, for every route; the templates only
  hide buttons a role cannot use.
* **CSRF**: every unsafe request must carry the session's token, as the
  ``csrf_token`` form field or the ``X-CSRF-Token`` header (compared in constant
  time), and a cross-site ``Origin`` is refused outright.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from starlette.datastructures import FormData

__all__ = [
    "ANY_ROLE",
    "Admin",
    "AnyUser",
    "Approver",
    "CsrfForm",
    "Editor",
    "SignedIn",
    "EDITORS",
    "APPROVERS",
    "ADMINS",
    "LoginThrottle",
    "NotSignedIn",
    "csrf_form",
    "csrf_token",
    "current_user",
    "require",
]

ANY_ROLE = ("analyst", "approver", "admin")
EDITORS = ("analyst", "approver", "admin")  # write and test rules, request activation
APPROVERS = ("approver", "admin")  # activate, pause, approve others' requests, start runs
ADMINS = ("admin",)  # accounts and settings

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class NotSignedIn(Exception):
    """Raised by :func:`current_user`; the app answers with a redirect to the sign-in page."""


def csrf_token(request: Request) -> str:
    token = request.session.get("csrf")
    if not isinstance(token, str) or len(token) < 32:
        token = secrets.token_urlsafe(32)
        request.session["csrf"] = token
    return token


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        # Browsers send Origin on every cross-site POST; a missing one is a
        # same-origin navigation or a non-browser client (which still needs the token).
        return origin is None
    # Behind a proxy that rewrites Host, the public name arrives as X-Forwarded-Host.
    hosts = {request.headers.get("host", ""), request.headers.get("x-forwarded-host", "")}
    return origin.split("://", 1)[-1] in hosts - {""}


async def csrf_form(request: Request) -> FormData:
    """The request's form, after checking its CSRF token (a dependency of every POST)."""
    form = await request.form()
    if request.method in SAFE_METHODS:
        return form
    if not _same_origin(request):
        raise HTTPException(403, "cross-site request refused")
    expected = request.session.get("csrf")
    given = request.headers.get("x-csrf-token") or form.get("csrf_token")
    if (
        not isinstance(expected, str)
        or not isinstance(given, str)
        or not hmac.compare_digest(given.encode(), expected.encode())
    ):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
    return form


def current_user(request: Request) -> dict[str, Any]:
    """The signed-in, active account (re-read from the control DB)."""
    cached = getattr(request.state, "user", None)
    if cached is not None:
        return cached
    name = request.session.get("u")
    if not isinstance(name, str):
        raise NotSignedIn()
    user = request.app.state.accounts.find(name)
    if user is None or not user["active"] or user["session_gen"] != request.session.get("g"):
        request.session.pop("u", None)
        request.session.pop("g", None)
        raise NotSignedIn()
    request.state.user = user
    return user


def require(*roles: str) -> Callable[..., dict[str, Any]]:
    """A dependency: the signed-in user, who must have one of ``roles`` (else 403)."""

    def check(user: Annotated[dict[str, Any], Depends(current_user)]) -> dict[str, Any]:
        if user["role"] not in roles:
            raise HTTPException(403, f"your role ({user['role']}) may not do this")
        return user

    return check


class LoginThrottle:
    """After ``limit`` failed sign-ins for a name within ``window`` seconds, refuse
    further attempts for that name until the window has passed (per process)."""

    def __init__(self, limit: int = 5, window: float = 300.0) -> None:
        self.limit = limit
        self.window = window
        self._fails: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, name: str, now: float) -> list[float]:
        fails = [t for t in self._fails.get(name, []) if now - t < self.window]
        if fails:
            self._fails[name] = fails
        else:
            self._fails.pop(name, None)
        return fails

    def blocked_for(self, name: str) -> float:
        now = time.monotonic()
        with self._lock:
            fails = self._recent(name, now)
            if len(fails) < self.limit:
                return 0.0
            return self.window - (now - fails[0])

    def failed(self, name: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._fails[name] = [*self._recent(name, now), now][-self.limit :]
            if len(self._fails) > 10_000:  # bound memory under a spray of names
                self._fails.clear()

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._fails.pop(name, None)


# Route parameter types: ``form: CsrfForm`` checks the token; ``user: Editor`` the role.
CsrfForm = Annotated[FormData, Depends(csrf_form)]
SignedIn = Annotated[dict[str, Any], Depends(current_user)]
AnyUser = Annotated[dict[str, Any], Depends(require(*ANY_ROLE))]
Editor = Annotated[dict[str, Any], Depends(require(*EDITORS))]
Approver = Annotated[dict[str, Any], Depends(require(*APPROVERS))]
Admin = Annotated[dict[str, Any], Depends(require(*ADMINS))]
