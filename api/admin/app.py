"""The admin UI as a FastAPI sub-application mounted at ``/admin``.

It has its own session middleware (cookie path ``/admin``), security headers,
static files (including the vendored CodeMirror build) and error pages, so none of
that touches the REST API it is mounted beside. Every page works through the same
services as the REST API: ``services.rules`` (RuleService) and ``services.runs``
(RunService); only accounts, the audit log and activation requests are its own
(:mod:`api.admin.store`). Pages are rendered by :mod:`api.admin.pages`.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.admin import security
from api.admin.pages import HERE, base_url, is_fetch, render
from api.admin.store import AccountStore, ActivationStore, AuditLog
from api.services import Services
from base.errors import Conflict, NotFound
from rules.models import set_link_schemes

__all__ = ["cookie_secure", "create_admin_app", "mount_admin"]

log = logging.getLogger("kvadrupel.admin")
PREFIX = "/admin"

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self'; connect-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

class _SecurityHeaders:
    """CSP (no inline or foreign scripts), no framing, no sniffing, no caching of pages."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope.get("path", "").startswith(f"{scope.get('root_path', '')}/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-frame-options", b"DENY"),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"same-origin"),
                ]
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _error(request: Request, status: int, title: str, detail: str) -> Response:
    if is_fetch(request):
        return render(request, "_error.html", status, title=title, detail=detail)
    try:
        security.current_user(request)
    except security.NotSignedIn:
        pass
    return render(request, "error.html", status, title=title, detail=detail)


def cookie_secure(settings: Any) -> bool:
    """The session cookie gets ``Secure`` when asked to, or when the deployment's
    public URL is https (then the UI is reached over https too)."""
    public = str(settings.public_url).strip().lower()
    return bool(settings.admin_cookie_secure) or public.startswith("https://")


def create_admin_app(services: Services) -> FastAPI:
    s = services.settings
    # The links banners may carry (checked when a rule is saved): this deployment's list.
    set_link_schemes(s.banner_link_schemes)
    app = FastAPI(title="Kvadrupel admin", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.services = services
    app.state.settings = s
    app.state.accounts = AccountStore(services.control, services.clock)
    app.state.audit = AuditLog(services.control, services.clock)
    app.state.activations = ActivationStore(services.control, services.clock)
    app.state.throttle = security.LoginThrottle(services.clock.time)
    app.state.client_address = security.ClientAddress(s.admin_trusted_proxies)
    app.state.today = services.clock.today

    from api.admin.routes import auth, rules, runs, users

    for module in (auth, rules, runs, users):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.exception_handler(security.NotSignedIn)
    async def _not_signed_in(request: Request, _: Exception) -> Response:
        if is_fetch(request):
            return JSONResponse({"detail": "not signed in"}, status_code=401)
        path = request.url.path
        nxt = (
            f"?next={quote(path, safe='/')}"
            if request.method == "GET" and path.startswith(PREFIX)
            else ""
        )
        return RedirectResponse(f"{base_url(request)}/login{nxt}", status_code=303)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        titles = {403: "Not allowed", 404: "Not found", 405: "Method not allowed"}
        return _error(
            request, exc.status_code, titles.get(exc.status_code, "Error"), str(exc.detail)
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        )
        return _error(request, 422, "Invalid request", detail)

    @app.exception_handler(NotFound)
    async def _nf(request: Request, exc: NotFound) -> Response:
        return _error(request, 404, "Not found", str(exc))

    @app.exception_handler(Conflict)
    async def _conflict(request: Request, exc: Conflict) -> Response:
        return _error(request, 409, "Conflict", str(exc))

    secret = s.admin_session_secret
    if not secret:
        secret = secrets.token_urlsafe(32)
        log.warning(
            "KVADRUPEL_ADMIN_SESSION_SECRET is not set: admin sessions are signed with a "
            "random key and end when this process restarts (and are not shared between "
            "API processes)"
        )
    app.add_middleware(
        SessionMiddleware,
        secret_key=secret,
        session_cookie="kvadrupel_admin",
        max_age=s.admin_session_max_age_s,
        path=PREFIX,
        same_site="lax",
        https_only=cookie_secure(s),
    )
    app.add_middleware(_SecurityHeaders)
    return app


def mount_admin(app: FastAPI, services: Services) -> None:
    """Mount the admin UI at ``/admin`` of the REST app (uses its ``today``)."""
    admin = create_admin_app(services)

    @app.get(PREFIX, include_in_schema=False)
    def _admin_root() -> RedirectResponse:
        return RedirectResponse(f"{PREFIX}/", status_code=307)

    app.mount(PREFIX, admin, name="admin")
