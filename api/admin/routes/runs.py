"""Runs: the list with a chart of matches per rule, a run's progress, starting one.

Runs are read through ``container.runs`` (RunService) and started with
:func:`scheduler.planner.start_run`, as ``POST /v1/runs`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from api.admin import charts
from api.admin.pages import redirect, render
from api.admin.security import AnyUser, Approver, CsrfForm
from scheduler.planner import start_run

router = APIRouter()


def _chart(runs_newest_first: list[dict[str, Any]]) -> dict[str, Any] | None:
    runs = list(reversed(runs_newest_first))
    if not runs:
        return None
    keys = sorted({k for r in runs for k in r["matches"]})
    series: dict[str, Sequence[float]] = {
        k: [float(r["matches"].get(k, 0)) for r in runs] for k in keys
    }
    return charts.lines([f"#{r['id']} {r['as_of']}" for r in runs], series)


@router.get("/runs")
def runs_list(
    request: Request,
    user: AnyUser,
) -> Response:
    runs = request.app.state.services.runs.list(limit=50)
    return render(
        request, "runs.html", runs=runs, chart=_chart(runs[:30]), today=request.app.state.today()
    )


@router.post("/runs")
async def start(
    request: Request,
    form: CsrfForm,
    user: Approver,
) -> Response:
    c = request.app.state.services
    text = str(form.get("as_of") or "")
    try:
        as_of = date.fromisoformat(text) if text else request.app.state.today()
    except ValueError:
        raise HTTPException(422, f"not a date (YYYY-MM-DD): {text[:40]!r}") from None
    run_id = await run_in_threadpool(
        start_run, c.shards, c.runs, c.bus, as_of, c.settings.range_target_users
    )
    await run_in_threadpool(
        request.app.state.audit.record,
        user["username"],
        "run.start",
        f"run:{run_id}",
        {"as_of": as_of.isoformat()},
    )
    return redirect(request, f"/runs/{run_id}")


@router.get("/runs/{run_id}")
def run_detail(run_id: int, request: Request, user: AnyUser, partial: int = 0) -> Response:
    run = request.app.state.services.runs.get(run_id)
    keys = sorted(set(run["matches"]) | set(run["errors"]) | set(run["rule_cpu"]))
    per_rule = [
        {"key": k, "matches": run["matches"].get(k, 0), "errors": run["errors"].get(k, 0),
         "cpu": run["rule_cpu"].get(k)}
        for k in keys
    ]
    return render(request, "_run.html" if partial else "run.html", run=run, per_rule=per_rule)
