"""The portal's and the mobile app's banner endpoints (portal token)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

import orjson

from api.auth import require
from api.problems import problem
from shards.router import parse_user_id

router = APIRouter(tags=["banners"], dependencies=[Depends(require("portal"))])


def _uid(raw: str) -> int | Response:
    try:
        return parse_user_id(raw)
    except ValueError as exc:
        return problem(422, "Invalid user id", str(exc))


@router.get(
    "/v1/users/{user_id}/banners",
    summary="A user's current banners, highest priority first",
    responses={200: {"content": {"application/json": {"example": {"banners": [{
        "id": "dl-expiring.1", "rule": "dl-expiring", "title": "Your licence expires soon",
        "body": "...", "link": "https://example.org/renew", "priority": 100,
        "created_at": "2026-11-24T02:00:00+00:00"}]}}}}, 304: {"description": "Not modified"}},
)
async def get_banners(user_id: str, request: Request) -> Response:
    uid = _uid(user_id)
    if isinstance(uid, Response):
        return uid
    store = request.app.state.container.shards.for_user(uid)
    version, items = await run_in_threadpool(store.banners, uid)
    etag = f'"{uid}-{version}"'
    headers = {"ETag": etag, "Cache-Control": f"private, max-age={request.app.state.max_age}"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(orjson.dumps({"banners": items}), media_type="application/json", headers=headers)


@router.post("/v1/users/{user_id}/banners/{banner_id}/dismiss", status_code=204,
             summary="Hide a banner for the rest of its episode")
async def dismiss(user_id: str, banner_id: str, request: Request) -> Response:
    uid = _uid(user_id)
    if isinstance(uid, Response):
        return uid
    store = request.app.state.container.shards.for_user(uid)
    found = await run_in_threadpool(store.dismiss, uid, banner_id)
    if not found:
        return problem(404, "Not found", f"user {uid} has no banner {banner_id!r}")
    return Response(status_code=204)
