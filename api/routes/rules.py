"""Rule authoring: create, version, test, enable (admin token)."""

from __future__ import annotations

from datetime import date
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from api.auth import require
from api.problems import problem, problem_responses
from api.services import Services
from base.errors import ChannelError, RuleValidationError
from catalogue.experiment import experiment_report
from catalogue.service import RuleService
from rules.models import RuleIn

router = APIRouter(prefix="/v1/rules", tags=["rules"], dependencies=[Depends(require("admin"))])


class TestIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    profile: dict[str, Any]
    as_of: date | None = None


class RuleUpdate(BaseModel):
    """PUT body: a RuleIn whose key may be omitted (the URL names the rule)."""

    model_config = ConfigDict(extra="forbid")
    key: str | None = None
    name: str = Field(min_length=1, max_length=200)
    source: str = Field(min_length=1, max_length=50_000)
    priority: int = Field(default=100, ge=0, le=1_000_000)
    group: str | None = None
    banner: dict[str, Any] | None = None
    email: dict[str, Any] | None = None
    examples: list[dict[str, Any]] = Field(default_factory=list)
    enabled: bool = True
    # Holdouts (docs/channels.md): validated by RuleIn (0–50 %; salt None: the key).
    holdout: float = 0.0
    salt: str | None = None
    # Content variants (docs/channels.md): validated by RuleIn.
    variants: list[dict[str, Any]] | None = None


def _svc(request: Request) -> RuleService:
    services: Services = request.app.state.services
    return services.rules


@router.get("", summary="List rules")
def list_rules(request: Request) -> dict[str, Any]:
    return {"rules": _svc(request).list()}


@router.post("", status_code=201, summary="Create a rule (version 1)")
def create_rule(rule: RuleIn, request: Request) -> dict[str, Any]:
    return _svc(request).create(rule, author="api")


@router.get("/{key}", summary="A rule at its current version")
def get_rule(key: str, request: Request) -> dict[str, Any]:
    return _svc(request).get(key)


@router.get("/{key}/experiment", summary="Conversions per arm, uplift with 95% intervals, SRM")
def get_experiment(key: str, request: Request) -> dict[str, Any]:
    """The rule's experiment report (docs/channels.md, "Goals and experiments"): users
    exposed and converted per arm and variant over every shard, uplift against the untreated users,
    the sample-ratio-mismatch check and a plain-words verdict."""
    services: Services = request.app.state.services
    rule = _svc(request).get(key)
    return experiment_report(rule, services.control, services.shards.stores)


@router.put("/{key}", summary="Save a new version of a rule")
def put_rule(key: str, body: RuleUpdate, request: Request) -> dict[str, Any]:
    rule = RuleIn.model_validate(body.model_dump() | {"key": body.key or key})
    return _svc(request).update(key, rule, author="api")


@router.get("/{key}/versions", summary="Every saved version of a rule")
def versions(key: str, request: Request) -> dict[str, Any]:
    return {"versions": _svc(request).versions(key)}


@router.post("/{key}/test", summary="Evaluate the rule on a given profile",
             responses=problem_responses(404, 422), response_model=dict[str, Any])
def test_rule(key: str, body: TestIn, request: Request) -> dict[str, Any] | Response:
    try:
        return _svc(request).test(key, body.profile, body.as_of)
    except ChannelError as exc:
        # A banner or e-mail template that fails on this profile: the caller's input
        # (rule or profile) is at fault, and the message says which key and line.
        return problem(422, "Template error", str(exc))


@router.post("/{key}/enable", summary="Enable a rule (its examples must pass)")
def enable(key: str, request: Request) -> dict[str, Any]:
    return _svc(request).set_enabled(key, True)


@router.post("/{key}/disable", summary="Pause a rule")
def disable(key: str, request: Request) -> dict[str, Any]:
    return _svc(request).set_enabled(key, False)


def _positive_sample(v: int | str) -> int | str:
    if isinstance(v, int) and v < 1:
        raise ValueError("sample must be a positive number of users or 'all'")
    return v


class PreviewIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    as_of: date
    sample: int | Literal["all"] = Field(default=20_000)
    version: int | None = Field(default=None, ge=1, le=2**31 - 1)

    _positive = field_validator("sample")(_positive_sample)


class ForecastIn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    from_: date = Field(alias="from")
    days: int = Field(default=30, ge=1, le=366)
    sample: int | Literal["all"] = Field(default=20_000)
    version: int | None = Field(default=None, ge=1, le=2**31 - 1)

    _positive = field_validator("sample")(_positive_sample)


class ShadowIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    as_of: date
    source: str | None = Field(default=None, max_length=50_000)
    version: int | None = Field(default=None, ge=1, le=2**31 - 1)
    sample: int | Literal["all"] = Field(default=20_000)

    _positive = field_validator("sample")(_positive_sample)


@router.post("/{key}/preview", summary="How many users match as of a date (nothing is sent)")
async def preview(key: str, body: PreviewIn, request: Request) -> dict[str, Any]:
    return await run_in_threadpool(
        _svc(request).preview, key, body.as_of, body.sample, body.version
    )


@router.post("/{key}/forecast", summary="Users newly matching per day (who would get the e-mail)")
async def forecast(key: str, body: ForecastIn, request: Request) -> dict[str, Any]:
    return await run_in_threadpool(_svc(request).forecast, key, body.from_, body.days, body.sample,
                                   body.version)


@router.post("/{key}/shadow", summary="A candidate version against the active one: gain / lose")
async def shadow(key: str, body: ShadowIn, request: Request) -> dict[str, Any]:
    return await run_in_threadpool(_svc(request).shadow, key, body.as_of, body.sample, body.source,
                                   body.version)


@router.get("/{key}/diff", summary="Differences between two versions")
def diff(key: str, request: Request, from_: int = Query(alias="from", ge=1, le=2**31 - 1),
         to: int = Query(ge=1, le=2**31 - 1)) -> dict[str, Any]:
    return _svc(request).diff(key, from_, to)


# -- canary rollout (docs/rules.md "Canary rollout") -------------------------------------
class RolloutIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    percent: int = Field(ge=1, le=100)
    # the version the other users stay on (starting a canary only); default: the one
    # saved before the current version
    from_version: int | None = Field(default=None, ge=1, le=2**31 - 1)


@router.post("/{key}/rollout", summary="Canary: the current version for N % of the users",
             responses=problem_responses(404, 409, 422), response_model=dict[str, Any])
def rollout(key: str, body: RolloutIn, request: Request) -> dict[str, Any] | Response:
    try:
        return _svc(request).rollout(key, body.percent, "api", body.from_version)
    except RuleValidationError as exc:
        return problem(422, "Examples fail", str(exc))


@router.post("/{key}/promote", summary="End a canary: the new version for everyone",
             responses=problem_responses(404, 409))
def promote(key: str, request: Request) -> dict[str, Any]:
    return _svc(request).promote(key, "api")


@router.post("/{key}/rollback",
             summary="End a canary: everyone back on the version it started from",
             responses=problem_responses(404, 409))
def rollback(key: str, request: Request) -> dict[str, Any]:
    return _svc(request).rollback(key, "api")
