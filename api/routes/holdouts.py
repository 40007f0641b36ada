"""The global control group: the installation-wide share of users sent nothing by any
rule (admin token; docs/channels.md, *Holdouts*). Per-rule holdouts are part of the rule
(``holdout``, ``salt`` in /v1/rules)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api.auth import require
from api.services import Services
from base.buckets import CONTROL_SALT
from channels.holdouts import MAX_CONTROL, get_control_share, set_control_share

router = APIRouter(prefix="/v1/control-group", tags=["holdouts"],
                   dependencies=[Depends(require("admin"))])


class ControlGroupIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    percent: float = Field(ge=0.0, le=MAX_CONTROL, allow_inf_nan=False,
                           description=f"share of all users, 0–{MAX_CONTROL:g} %")


def _out(percent: float) -> dict[str, Any]:
    return {"percent": percent, "max": MAX_CONTROL, "salt": CONTROL_SALT}


@router.get("", summary="The global control group's share of users")
async def get_control_group(request: Request) -> dict[str, Any]:
    services: Services = request.app.state.services
    return _out(await run_in_threadpool(get_control_share, services.control))


@router.put("", summary="Set the global control group's share (0–15 %)")
async def put_control_group(body: ControlGroupIn, request: Request) -> dict[str, Any]:
    services: Services = request.app.state.services
    pct = await run_in_threadpool(set_control_share, services.control, body.percent, "api",
                                  services.clock.now())
    return _out(pct)
