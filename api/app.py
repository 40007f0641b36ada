"""The FastAPI application: REST for the portal, the mobile app, ingest and analysts.

``create_app`` takes already-built :class:`~api.services.Services` (the composition
root's container); the process that serves it (``kvadrupel api`` or the demo) owns
their life.
"""

from __future__ import annotations

import orjson
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from api import fast, problems
from api.admin import mount_admin
from api.observability import MetricsMiddleware, register_control_collector
from api.routes import banners, engagement, events, holdouts, rules, runs
from api.services import Services
from api.shedding import LoadShedMiddleware
from base.metrics import metrics_payload

__all__ = ["create_app"]


def create_app(services: Services) -> FastAPI:
    """The REST app on ``services``; every "today" it uses is ``services.clock``'s."""
    s = services.settings
    app = FastAPI(title="Kvadrupel", version=services.version,
                  description="Rule-based targeted notifications: ingest, rules, runs, banners.")
    app.state.services = services
    app.state.tokens = {"admin": s.admin_token, "ingest": s.ingest_token, "portal": s.portal_token}
    app.state.max_age = s.banner_max_age_s
    app.state.clock = services.clock
    app.state.today = services.clock.today
    problems.install(app)
    app.add_middleware(MetricsMiddleware)
    register_control_collector(services.control)
    for module in (events, rules, holdouts, runs, banners, engagement):
        app.include_router(module.router)
    mount_admin(app, services)  # the admin UI at /admin (api/admin/)
    fast.install(app, services)  # the lean path for GET /v1/users/{id}/banners (api/fast.py)
    # outermost: api/shedding.py
    app.add_middleware(LoadShedMiddleware, max_inflight=s.api_max_inflight)

    @app.get("/healthz", tags=["ops"], summary="Liveness")
    def healthz() -> Response:
        return Response(orjson.dumps({"status": "ok"}), media_type="application/json")

    @app.get("/readyz", tags=["ops"], summary="Readiness: control DB, shards and bus reachable",
             responses={503: {"description": "A dependency is unreachable"}})
    async def readyz() -> Response:
        ok, checks = await run_in_threadpool(services.readiness)
        return Response(
            orjson.dumps({"ready": ok, "checks": checks}),
            status_code=200 if ok else 503,
            media_type="application/json",
        )

    @app.get(
        "/metrics", tags=["ops"], summary="Prometheus metrics", response_class=PlainTextResponse
    )
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(metrics_payload().decode(), media_type=CONTENT_TYPE_LATEST)

    return app
