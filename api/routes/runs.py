"""Runs and campaigns (admin token).

* ``POST /v1/runs`` ``{"as_of"?, "rules"?}``: start a run now, over every active
  rule or only the given ones; ``GET /v1/runs``, ``GET /v1/runs/{id}``: progress
  (ranges done/running/parked of total, users, users/s, ETA, matches and errors
  per rule, per-worker throughput).
* ``POST /v1/campaigns`` ``{"rules"?, "at", "as_of"?, "name"?}``: a run of the
  given rules (all when omitted) at a given time, fired by the scheduler
  (``kvadrupel scheduler``); ``GET /v1/campaigns[?status=]``,
  ``GET /v1/campaigns/{id}`` (with its run once started),
  ``DELETE /v1/campaigns/{id}``: cancel one still scheduled (409 otherwise).
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api.auth import require
from api.services import Services
from scheduler.campaigns import CampaignService, UnknownRules, check_rules
from scheduler.planner import start_run

router = APIRouter(tags=["runs"], dependencies=[Depends(require("admin"))])

RuleKeys = list[str] | None


class RunIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    as_of: date | None = None
    rules: RuleKeys = Field(
        default=None,
        min_length=1,
        max_length=500,
        description="restrict the run to these rule keys (default: every active rule)",
    )


class CampaignIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    at: datetime = Field(
        description="when to run; without an offset it is read in KVADRUPEL_TIMEZONE"
    )
    rules: RuleKeys = Field(default=None, min_length=1, max_length=500,
                            description="rule keys to evaluate (default: every active rule)")
    as_of: date | None = Field(
        default=None, description="evaluation date (default: the date of 'at')"
    )
    name: str | None = Field(default=None, max_length=200)


def _campaigns(request: Request) -> CampaignService:
    return CampaignService(request.app.state.services.control, request.app.state.services.clock)


def _check_rules(request: Request, keys: list[str] | None) -> None:
    try:
        with request.app.state.services.control.connect() as conn:
            check_rules(conn, keys)
    except UnknownRules as exc:
        raise HTTPException(422, str(exc)) from None


@router.post("/v1/runs", status_code=202, summary="Start a run now (all rules, or the given ones)")
async def create_run(request: Request, body: RunIn | None = None) -> dict[str, Any]:
    c: Services = request.app.state.services
    body = body or RunIn()
    _check_rules(request, body.rules)
    as_of = body.as_of or request.app.state.today()
    run_id = await run_in_threadpool(start_run, c.shards, c.runs, c.bus, as_of,
                                     c.settings.range_target_users, rules=body.rules)
    return c.runs.get(run_id)


@router.get("/v1/runs", summary="Recent runs")
def list_runs(request: Request, limit: int = Query(50, ge=1, le=500)) -> dict[str, Any]:
    c: Services = request.app.state.services
    return {"runs": c.runs.list(limit)}


@router.get("/v1/runs/{run_id}", summary="A run's progress and figures")
def get_run(run_id: int, request: Request) -> dict[str, Any]:
    c: Services = request.app.state.services
    return c.runs.get(run_id)


@router.post(
    "/v1/campaigns", status_code=201, summary="Schedule a run of chosen rules at a chosen time"
)
def create_campaign(request: Request, body: CampaignIn) -> dict[str, Any]:
    at = body.at
    if at.tzinfo is None:
        at = at.replace(tzinfo=ZoneInfo(request.app.state.services.settings.timezone))
    try:
        return _campaigns(request).create(at, body.rules, as_of=body.as_of, name=body.name)
    except UnknownRules as exc:
        raise HTTPException(422, str(exc)) from None


@router.get("/v1/campaigns", summary="Campaigns, latest first")
def list_campaigns(request: Request, status: str | None = None,
                   limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
    return {"campaigns": _campaigns(request).list(status, limit)}


@router.get("/v1/campaigns/{campaign_id}", summary="A campaign (with its run once started)")
def get_campaign(campaign_id: int, request: Request) -> dict[str, Any]:
    campaign = _campaigns(request).get(campaign_id)
    if campaign["run_id"] is not None:
        campaign["run"] = request.app.state.services.runs.get(campaign["run_id"])
    return campaign


@router.delete("/v1/campaigns/{campaign_id}", summary="Cancel a scheduled campaign")
def cancel_campaign(campaign_id: int, request: Request) -> dict[str, Any]:
    return _campaigns(request).cancel(campaign_id)
