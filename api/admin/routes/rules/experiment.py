"""A rule's experiment page: conversion rate per arm with its 95 % interval, the
uplift against the untreated users, the sample-ratio check and the verdict — the
report of ``GET /v1/rules/{key}/experiment`` (catalogue/experiment.py), drawn as
inline SVG."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import Response

from api.admin.charts import bars
from api.admin.pages import render
from api.admin.routes.rules.common import router, rule_service
from api.admin.security import AnyUser
from catalogue.experiment import experiment_report


def rate_chart(report: dict[str, Any]) -> dict[str, Any]:
    """Bars of the conversion rate (%) per arm, with the Wilson interval as whiskers."""
    items: list[tuple[str, float, float | None, float | None]] = []
    for a in report["by_arm"]:
        if not a["exposed"]:
            continue
        lo, hi = a["ci"]
        items.append((a["arm"], 100.0 * a["rate"], 100.0 * lo, 100.0 * hi))
    return bars(items, width=640, height=220)


@router.get("/rules/{key}/experiment")
def experiment(key: str, request: Request, user: AnyUser) -> Response:
    rule = rule_service(request).get(key)
    services = request.app.state.services
    report = experiment_report(rule, services.control, services.shards.stores)
    return render(request, "rule_experiment.html", rule=rule, tab="experiment", report=report,
                  chart=rate_chart(report))
