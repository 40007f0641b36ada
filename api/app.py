"""The FastAPI application: REST for the portal, the mobile app, ingest and analysts.

``create_app`` takes an already-built :class:`~kvadrupel.container.Container`; the
process that serves it (``kvadrupel api`` or the demo) owns the container's life.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime
from zoneinfo import ZoneInfo

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import orjson

from api import fast, problems
from api.admin import mount_admin
from api.routes import banners, events, rules, runs
from kvadrupel import __version__
from kvadrupel.container import Container

__all__ = ["create_app"]


def create_app(container: Container, *, today: Callable[[], date] | None = None) -> FastAPI:
    s = container.settings
    app = FastAPI(title="Kvadrupel", version=__version__,
                  description="Rule-based targeted notifications: ingest, rules, runs, banners.")
    app.state.container = container
    app.state.tokens = {"admin": s.admin_token, "ingest": s.ingest_token, "portal": s.portal_token}
    app.state.max_age = s.banner_max_age_s
    tz = ZoneInfo(s.timezone)
    app.state.today = today or (lambda: datetime.now(tz).date())
    problems.install(app)
    for module in (events, rules, runs, banners):
        app.include_router(module.router)
    mount_admin(app, container)  # the admin UI at /admin (api/admin/)
    fast.install(app, container)  # the lean path for GET /v1/users/{id}/banners (api/fast.py)

    @app.get("/healthz", tags=["ops"], summary="Liveness")
    def healthz() -> Response:
        return Response(orjson.dumps({"status": "ok"}), media_type="application/json")

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest().decode(), media_type=CONTENT_TYPE_LATEST)

    return app
