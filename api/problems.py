"""Errors as RFC 9457 ``application/problem+json``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import orjson

from kvadrupel.errors import (
    Conflict,
    NotFound,
    RuleCompileError,
    RuleValidationError,
    ShardUnavailable,
)

PROBLEM = "application/problem+json"


def problem(status: int, title: str, detail: str | None = None, **extra: Any) -> Response:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return Response(orjson.dumps(body), status_code=status, media_type=PROBLEM, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        return problem(exc.status_code, _titles.get(exc.status_code, "Error"), str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        errors = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg")} for e in exc.errors()
        ]
        detail = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors)
        return problem(422, "Invalid request", detail, errors=errors)

    @app.exception_handler(RuleValidationError)
    async def _rule(_: Request, exc: RuleValidationError) -> Response:
        return problem(422, "Invalid rule", str(exc), errors=exc.problems)

    @app.exception_handler(RuleCompileError)
    async def _compile(_: Request, exc: RuleCompileError) -> Response:
        return problem(422, "Invalid rule", str(exc),
                       errors=[{"field": "source", "line": exc.line, "message": exc.reason}])

    @app.exception_handler(NotFound)
    async def _nf(_: Request, exc: NotFound) -> Response:
        return problem(404, "Not found", str(exc))

    @app.exception_handler(Conflict)
    async def _conflict(_: Request, exc: Conflict) -> Response:
        return problem(409, "Conflict", str(exc))

    @app.exception_handler(ShardUnavailable)
    async def _shard(_: Request, exc: ShardUnavailable) -> Response:
        r = problem(503, "Service unavailable", "storage temporarily unavailable")
        r.headers["Retry-After"] = "1"
        return r


_titles = {400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found",
           405: "Method not allowed", 409: "Conflict", 413: "Payload too large",
           422: "Invalid request", 503: "Service unavailable"}
