"""Rule authoring: create, version, test, enable (admin token)."""

from __future__ import annotations

from datetime import date
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from api.auth import require
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


def _svc(request: Request):  # noqa: ANN202
    return request.app.state.container.rules


@router.get("", summary="List rules")
def list_rules(request: Request) -> dict[str, Any]:
    return {"rules": _svc(request).list()}


@router.post("", status_code=201, summary="Create a rule (version 1)")
def create_rule(rule: RuleIn, request: Request) -> dict[str, Any]:
    return _svc(request).create(rule, author="api")


@router.get("/{key}", summary="A rule at its current version")
def get_rule(key: str, request: Request) -> dict[str, Any]:
    return _svc(request).get(key)


@router.put("/{key}", summary="Save a new version of a rule")
def put_rule(key: str, body: RuleUpdate, request: Request) -> dict[str, Any]:
    rule = RuleIn.model_validate(body.model_dump() | {"key": body.key or key})
    return _svc(request).update(key, rule, author="api")


@router.get("/{key}/versions", summary="Every saved version of a rule")
def versions(key: str, request: Request) -> dict[str, Any]:
    return {"versions": _svc(request).versions(key)}


@router.post("/{key}/test", summary="Evaluate the rule on a given profile")
def test_rule(key: str, body: TestIn, request: Request) -> dict[str, Any]:
    return _svc(request).test(key, body.profile, body.as_of)


@router.post("/{key}/enable", summary="Enable a rule (its examples must pass)")
def enable(key: str, request: Request) -> dict[str, Any]:
    return _svc(request).set_enabled(key, True)


@router.post("/{key}/disable", summary="Pause a rule")
def disable(key: str, request: Request) -> dict[str, Any]:
    return _svc(request).set_enabled(key, False)
