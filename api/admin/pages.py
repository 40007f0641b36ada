"""Rendering pages of the admin UI: the Jinja2 environment, the common context,
flash messages and redirects inside the UI (used by the app and every route)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from api.admin import security

__all__ = ["base_url", "flash", "is_fetch", "redirect", "render"]

HERE = Path(__file__).parent

_ENV = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENV.filters["pretty"] = lambda v: orjson.dumps(
    v, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str
).decode()
_ENV.filters["num"] = lambda v: (
    "–" if v is None else (f"{v:,.0f}" if isinstance(v, int | float) else v)
)
_ENV.filters["ts"] = lambda v: (
    v.strftime("%Y-%m-%d %H:%M:%S UTC")
    if isinstance(v, datetime)
    else str(v or "")[:19].replace("T", " ")
)


def base_url(request: Request) -> str:
    return request.scope.get("root_path", "") or ""


def is_fetch(request: Request) -> bool:
    return request.headers.get("x-requested-with") == "fetch"


def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    """Render a page (or a fragment) with the common context."""
    user = getattr(request.state, "user", None)
    flashes = request.session.pop("flash", []) if not template.startswith("_") else []
    html = _ENV.get_template(template).render(
        request=request,
        base=base_url(request),
        user=user,
        csrf=security.csrf_token(request),
        flashes=flashes,
        role=(user or {}).get("role"),
        settings=request.app.state.settings,
        APPROVERS=security.APPROVERS,
        EDITORS=security.EDITORS,
        ADMINS=security.ADMINS,
        **context,
    )
    return HTMLResponse(html, status_code=status)


def flash(request: Request, text: str, level: str = "ok") -> None:
    request.session["flash"] = [*request.session.get("flash", []), [level, text]][-5:]


def redirect(request: Request, path: str) -> RedirectResponse:
    return RedirectResponse(base_url(request) + path, status_code=303)
