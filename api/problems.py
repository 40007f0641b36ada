"""Errors as RFC 9457 ``application/problem+json`` — in responses and in the OpenAPI document."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.auth import AuthError
from base.errors import (
    Conflict,
    NotFound,
    RuleCompileError,
    RuleError,
    RuleValidationError,
    ShardUnavailable,
)

PROBLEM = "application/problem+json"
log = logging.getLogger("kvadrupel.api")


def problem(status: int, title: str, detail: str | None = None,
            headers: dict[str, str] | None = None, **extra: Any) -> Response:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    h = dict(headers or {})
    if status == 401:
        h.setdefault("WWW-Authenticate", "Bearer")
    return Response(orjson.dumps(body), status_code=status, media_type=PROBLEM, headers=h or None)


def install(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        return problem(exc.status_code, _titles.get(exc.status_code, "Error"), str(exc.detail),
                       headers=dict(exc.headers) if exc.headers else None)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        errors = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg")} for e in exc.errors()
        ]
        detail = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors)
        return problem(422, "Invalid request", detail, errors=errors)

    @app.exception_handler(AuthError)
    async def _auth(_: Request, exc: AuthError) -> Response:
        headers = {"WWW-Authenticate": exc.challenge} if exc.status == 401 else None
        return problem(exc.status, _titles[exc.status], exc.detail, headers=headers)

    @app.exception_handler(RuleValidationError)
    async def _rule(_: Request, exc: RuleValidationError) -> Response:
        return problem(422, "Invalid rule", str(exc), errors=exc.problems)

    @app.exception_handler(RuleCompileError)
    async def _compile(_: Request, exc: RuleCompileError) -> Response:
        return problem(422, "Invalid rule", str(exc),
                       errors=[{"field": "source", "line": exc.line, "message": exc.reason}])

    @app.exception_handler(RuleError)
    async def _rule_failed(_: Request, exc: RuleError) -> Response:
        # The rule's code failed in its sandbox child (it crashed the child, hit a
        # limit, or a template failed): the rule's fault, reported; this process is fine.
        return problem(422, "The rule failed", str(exc))

    @app.exception_handler(NotFound)
    async def _nf(_: Request, exc: NotFound) -> Response:
        return problem(404, "Not found", str(exc))

    @app.exception_handler(Conflict)
    async def _conflict(_: Request, exc: Conflict) -> Response:
        return problem(409, "Conflict", str(exc))

    @app.exception_handler(ShardUnavailable)
    async def _shard(_: Request, exc: ShardUnavailable) -> Response:
        return problem(503, "Service unavailable", "storage temporarily unavailable",
                       headers={"Retry-After": "1"})

    @app.exception_handler(ValidationError)
    async def _model(_: Request, exc: ValidationError) -> Response:
        # A model built from request input inside a handler (e.g. a path key checked by
        # the body's model): the input was invalid, not the server.
        errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg")}
                  for e in exc.errors()]
        detail = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors)
        return problem(422, "Invalid request", detail, errors=errors)

    @app.exception_handler(OverflowError)
    async def _overflow(_: Request, exc: OverflowError) -> Response:
        return problem(422, "Invalid request", f"a number is out of range: {exc}")

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> Response:
        log.error("unhandled error", exc_info=exc)
        return problem(500, "Internal server error", "unexpected error; it has been logged")

    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        document_problems(schema)
        app.openapi_schema = schema
        return schema

    # FastAPI's documented way to extend the schema; mypy refuses assigning a method
    app.openapi = openapi  # type: ignore[method-assign]


_titles = {400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found",
           405: "Method not allowed", 409: "Conflict", 413: "Payload too large",
           422: "Invalid request", 500: "Internal server error", 503: "Service unavailable"}

_details = {400: "There was an error parsing the body", 401: "missing bearer token",
            403: "a user token may only access its own banners",
            404: "not found", 409: "already exists", 413: "too large",
            422: "user_id: user id must be between 1 and 2**63-1",
            503: "storage temporarily unavailable"}

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details",
    "type": "object",
    "required": ["type", "title", "status"],
    "properties": {
        "type": {"type": "string", "description": "always `about:blank`: see `title`"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "errors": {"type": "array", "items": {}, "description": "per-item reasons"},
    },
    "additionalProperties": True,
}
_REF = {"$ref": "#/components/schemas/Problem"}


def _problem_example(status: int) -> dict[str, Any]:
    return {"type": "about:blank", "title": _titles.get(status, "Error"), "status": status,
            "detail": _details.get(status, "")}


def _problem_response(status: int) -> dict[str, Any]:
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = {"schema": {"type": "string"}, "description": "`Bearer`"}
    if status == 503:
        headers["Retry-After"] = {"schema": {"type": "string"}, "description": "seconds"}
    out: dict[str, Any] = {
        "description": _titles.get(status, "Error"),
        "content": {PROBLEM: {"schema": _REF, "example": _problem_example(status)}},
    }
    if headers:
        out["headers"] = headers
    return out


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for a route: problem+json with the Problem schema and an example."""
    return {s: _problem_response(s) for s in statuses}


def document_problems(schema: dict[str, Any]) -> None:
    """Make the document say what the API does: every error is problem+json.

    FastAPI documents its validation errors as ``application/json``
    ``HTTPValidationError``; here they become problem+json, and every operation that
    needs a bearer token also lists its 401 and 503 (storage or bus unavailable),
    every operation with input its 422 (and with a body its 400), one with a path
    parameter its 404, and
    every operation 500.
    """
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = PROBLEM_SCHEMA
    for item in schema.get("paths", {}).values():
        for method, op in item.items():
            if method not in ("get", "put", "post", "delete", "patch"):
                continue
            responses = op.setdefault("responses", {})
            ok: dict[str, Any] = next(
                (r for c, r in responses.items() if c.startswith("2")), {}
            )
            html_page = "text/html" in (ok.get("content") or {})
            for code, resp in list(responses.items()):
                if code.startswith(("4", "5")):
                    content = resp.get("content") or {}
                    # FastAPI's default (JSON), or nothing said → problem+json; but an
                    # HTML page's own error pages, or a media type a route declares
                    # itself, are left as they are.
                    if "application/json" in content or (not content and not html_page):
                        ex = ((content.get(PROBLEM) or {}).get("example")
                              or _problem_example(int(code)))
                        resp["content"] = {PROBLEM: {"schema": _REF, "example": ex}}
            if op.get("security") and "401" not in responses:
                responses["401"] = _problem_response(401)
            if any(p.get("in") == "path" for p in op.get("parameters", ())):
                responses.setdefault("404", _problem_response(404))  # no such resource
            if op.get("requestBody"):
                responses.setdefault("400", _problem_response(400))  # body is not JSON at all
            if (op.get("parameters") or op.get("requestBody")) and "422" not in responses:
                responses["422"] = _problem_response(422)
            responses.setdefault("500", _problem_response(500))
            if op.get("security"):  # every authenticated operation reaches storage or the bus
                responses.setdefault("503", _problem_response(503))
