"""The portal's and the mobile app's banner endpoints.

``GET /v1/users/{user_id}/banners`` is normally answered by the lean ASGI path in
``api.fast`` before it reaches FastAPI; this route documents it (OpenAPI, ``/docs``)
and answers what the fast path passes on, with the same logic (``BannerApi``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from api.auth import bearer_scheme
from api.problems import problem, problem_responses
from shards.router import MAX_USER_ID, parse_user_id

router = APIRouter(tags=["banners"], dependencies=[Depends(bearer_scheme)])

_UID_SCHEMA = {"type": "integer", "format": "int64", "minimum": 1, "maximum": MAX_USER_ID,
               "examples": [1000001]}


class Banner(BaseModel):
    id: str = Field(description="`<rule>.<episode>`: the id to dismiss")
    rule: str
    title: str
    body: str
    link: str
    priority: int = Field(description="higher first")
    rule_version: int
    created_at: str = Field(description="ISO 8601, UTC")
    variant: str | None = Field(
        default=None, description="the content variant shown, when the rule has variants: "
        "echo it with impressions and clicks (`?variant=`)")


class BannerList(BaseModel):
    banners: list[Banner]


_EXAMPLE = {"banners": [{
    "id": "dl-expiring.1", "rule": "dl-expiring", "title": "Your licence expires soon",
    "body": "Renew it before 2026-12-12.", "link": "https://example.org/renew", "priority": 100,
    "rule_version": 2, "created_at": "2026-11-24T02:00:00+00:00"}]}
_ETAG = {"ETag": {"description": 'strong: `"<user>-<version>"`', "schema": {"type": "string"}},
         "Banner-Version": {"description": "the banner-set version: `since_version` for "
                                           "long-polling", "schema": {"type": "string"}},
         "Cache-Control": {"description": "`private, max-age=N`", "schema": {"type": "string"}}}


def _uid(raw: str) -> int | Response:
    try:
        return parse_user_id(raw)
    except ValueError as exc:
        return problem(422, "Invalid user id", str(exc))


def _auth(request: Request, uid: int) -> None:
    header = request.headers.get("authorization")
    request.app.state.banner_api.auth.authorize(header.encode() if header else None, uid)


@router.get(
    "/v1/users/{user_id}/banners",
    summary="A user's current banners, highest priority first",
    description=(
        "Revalidate with `If-None-Match`: `304` while the set is unchanged (answered from "
        "memory). Mobile long-poll: `?since_version=V&wait=S` answers at once with `200` "
        "when the version is not `V`, else waits up to `S` seconds (capped by the server) "
        "for a change and answers `304` if none came; past the server's bound on waiting "
        "requests: `503` with `Retry-After`.\n\n"
        "Auth: the portal's service token (any user) or the user's own JWT (`sub`)."),
    response_model=None,
    responses={
        200: {"model": BannerList, "headers": _ETAG,
              "content": {"application/json": {"example": _EXAMPLE}}},
        304: {"description": "Not modified (the ETag still matches / no change while waiting)",
              "headers": _ETAG},
        **problem_responses(401, 403, 422, 503),
    },
)
async def get_banners(
    request: Request,
    user_id: Annotated[str, Path(description="user id (1 .. 2**63-1)",
                                 json_schema_extra=_UID_SCHEMA)],
    since_version: Annotated[int | None, Query(
        ge=0, le=MAX_USER_ID, description="long-poll: the version the client has")] = None,
    wait: Annotated[float, Query(
        ge=0, le=3600, description="long-poll: seconds to wait for a change (server-capped)",
        examples=[25])] = 0.0,
    if_none_match: Annotated[str | None, Header(
        description='an ETag from an earlier answer, e.g. `"1000001-3"`')] = None,
) -> Response:
    uid = _uid(user_id)
    if isinstance(uid, Response):
        return uid
    _auth(request, uid)
    api = request.app.state.banner_api
    status, headers, body = await api.get(
        uid, if_none_match.encode() if if_none_match is not None else None, since_version, wait)
    return Response(body, status_code=status,
                    headers={k.decode(): v.decode() for k, v in headers})


@router.post(
    "/v1/users/{user_id}/banners/{banner_id}/dismiss",
    status_code=204,
    summary="Hide a banner for the rest of its episode",
    description="Auth: the portal's service token or the user's own JWT. The banner set's "
                "version (and so the ETag) changes.",
    response_model=None,
    responses={204: {"description": "Dismissed (or already dismissed)"},
               **problem_responses(401, 403, 404, 422, 503)},
)
async def dismiss(
    request: Request,
    user_id: Annotated[str, Path(description="user id (1 .. 2**63-1)",
                                 json_schema_extra=_UID_SCHEMA)],
    banner_id: Annotated[str, Path(description="a banner's `id`", examples=["dl-expiring.1"])],
) -> Response:
    uid = _uid(user_id)
    if isinstance(uid, Response):
        return uid
    _auth(request, uid)
    found = await request.app.state.banner_api.dismiss(uid, banner_id)
    if not found:
        return problem(404, "Not found", f"user {uid} has no banner {banner_id!r}")
    return Response(status_code=204)
