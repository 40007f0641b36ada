"""The FastAPI application: REST for the portal, the mobile app, ingest and analysts.

``create_app`` takes an already-built :class:`~kvadrupel.container.Container`; the
process that serves it (``kvadrupel api`` or the demo) owns the container's life.
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
from api.routes import banners, engagement, events, rules, runs
from api.shedding import LoadShedMiddleware
from kvadrupel import __version__
from kvadrupel.container import Container
from kvadrupel.ops import metrics_payload, readiness

__all__ = ["create_app"]


def create_app(container: Container) -> FastAPI:
    """The REST app on ``container``; every "today" it uses is ``container.clock``'s."""
    s = container.settings
    app = FastAPI(title="Kvadrupel", version=__version__,
                  description="Rule-based targeted notifications: ingest, rules, runs, banners.")
    app.state.container = container
    app.state.tokens = {"admin": s.admin_token, "ingest": s.ingest_token, "portal": s.portal_token}
    app.state.max_age = s.banner_max_age_s
    app.state.clock = container.clock
    app.state.today = container.clock.today
    problems.install(app)
    app.add_middleware(MetricsMiddleware)
    register_control_collector(container.control)
    for module in (events, rules, runs, banners, engagement):
        app.include_router(module.router)
    mount_admin(app, container)  # the admin UI at /admin (api/admin/)
    fast.install(app, container)  # the lean path for GET /v1/users/{id}/banners (api/fast.py)
    # outermost: api/shedding.py
    app.add_middleware(LoadShedMiddleware, max_inflight=s.api_max_inflight)

    @app.get("/healthz", tags=["ops"], summary="Liveness")
    def healthz() -> Response:
        return Response(orjson.dumps({"status": "ok"}), media_type="application/json")

    @app.get("/readyz", tags=["ops"], summary="Readiness: control DB, shards and bus reachable",
             responses={503: {"description": "A dependency is unreachable"}})
    async def readyz() -> Response:
        ok, checks = await run_in_threadpool(readiness, container)
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
