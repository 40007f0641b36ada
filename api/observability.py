"""Request metrics (a pure ASGI middleware: cheap on the hot banner route) and the
control-DB gauges computed when Prometheus scrapes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector
from sqlalchemy import func, select

from base import metrics
from shards.schema import ledger, rules, runs


class MetricsMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            # The route template, never the raw path: user ids must not become labels.
            label = getattr(route, "path", None) or scope.get("kvadrupel.route") or "unmatched"
            metrics.HTTP_REQUESTS.labels(label, scope["method"], str(status[0])).inc()
            metrics.HTTP_LATENCY.labels(label).observe(time.perf_counter() - start)


class ControlCollector(Collector):
    """Gauges read from the control DB at scrape time (a few indexed counts)."""

    def __init__(self, control: Any) -> None:
        self.control = control

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            with self.control.connect() as conn:
                quarantined = conn.execute(select(func.count()).select_from(rules)
                                           .where(rules.c.status == "quarantined")).scalar() or 0
                running = conn.execute(select(func.count()).select_from(runs)
                                       .where(runs.c.status == "running")).scalar() or 0
                pending = conn.execute(select(func.count()).select_from(ledger)
                                       .where(ledger.c.status == "pending")).scalar() or 0
                failed = conn.execute(select(func.count()).select_from(ledger)
                                      .where(ledger.c.status == "failed")).scalar() or 0
        except Exception:  # noqa: BLE001 - a scrape must not fail because the DB is down
            return
        yield GaugeMetricFamily(
            "kvadrupel_rules_quarantined", "Rules in quarantine", value=quarantined
        )
        yield GaugeMetricFamily("kvadrupel_run_running", "Runs still running", value=running)
        yield GaugeMetricFamily(
            "kvadrupel_ledger_pending", "Messages waiting to be sent", value=pending
        )
        yield GaugeMetricFamily(
            "kvadrupel_ledger_failed", "Messages that failed for good", value=failed
        )


_registered: dict[int, ControlCollector] = {}


def register_control_collector(control: Any) -> None:
    """Register once per process (the registry refuses duplicate metric names)."""
    if _registered:
        _registered[0].control = control  # the newest app's database (tests build several)
        return
    collector = ControlCollector(control)
    REGISTRY.register(collector)
    _registered[0] = collector
