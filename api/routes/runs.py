"""Nightly runs: start one, follow its progress (admin token)."""

from __future__ import annotations

from datetime import date
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from api.auth import require
from scheduler.planner import start_run

router = APIRouter(prefix="/v1/runs", tags=["runs"], dependencies=[Depends(require("admin"))])


class RunIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    as_of: date | None = None


@router.post("", status_code=202, summary="Start a run over every user")
async def create_run(request: Request, body: RunIn | None = None) -> dict[str, Any]:
    c = request.app.state.container
    as_of = (body.as_of if body else None) or request.app.state.today()
    run_id = await run_in_threadpool(start_run, c.shards, c.runs, c.bus, as_of,
                                     c.settings.range_target_users)
    return c.runs.get(run_id)


@router.get("", summary="Recent runs")
def list_runs(request: Request) -> dict[str, Any]:
    return {"runs": request.app.state.container.runs.list()}


@router.get("/{run_id}", summary="A run's status and figures")
def get_run(run_id: int, request: Request) -> dict[str, Any]:
    return request.app.state.container.runs.get(run_id)
