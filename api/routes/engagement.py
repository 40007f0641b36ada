"""Engagement and the user's say: impressions, clicks, "why", preferences, unsubscribe.

* ``POST /v1/users/{id}/banners/{banner_id}/impression`` and ``.../click`` — the
  portal or the app reports a banner seen / clicked (portal token or the user's
  JWT); counted per rule per day in memory and flushed periodically
  (channels/engagement.py), never one database row per impression;
* ``GET /v1/users/{id}/banners/{banner_id}/why`` (admin) — the rule, version,
  as-of date and the profile fields the rule read, with their values, plus the
  episode's messages from the ledger;
* ``GET/PUT/PATCH /v1/users/{id}/preferences`` — opt-outs per channel and per rule
  category (portal token or the user's JWT);
* ``GET/POST /v1/unsubscribe/{token}`` — the link in every e-mail; no login, the
  signed token is the authority. GET only shows a confirmation page (scanners
  follow links); POST with ``List-Unsubscribe=One-Click`` (RFC 8058 one-click, or
  the page's button) unsubscribes;
* ``GET /v1/rules/{key}/engagement`` and ``GET /v1/deliveries`` (admin) — counts
  per rule per day; delivery outcomes per channel and the dead letters, per rule
  and per run.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import time
from collections.abc import AsyncIterator
from datetime import date, datetime, timedelta
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from api.auth import Authenticator, bearer_scheme, require
from api.problems import problem, problem_responses
from api.services import Services
from channels.engagement import EngagementCounter
from channels.episodes import read_episode
from channels.preferences import merge_preferences, read_preferences, write_preferences
from channels.unsubscribe import Unsubscriber
from rules.models import VARIANT_KEY_RE
from shards.router import MAX_USER_ID, parse_user_id
from shards.schema import rules as rules_table

log = logging.getLogger("kvadrupel.api.engagement")

_UID = {"type": "integer", "format": "int64", "minimum": 1, "maximum": MAX_USER_ID,
        "examples": [1000001]}
_BANNER_ID = r"^[a-z0-9][a-z0-9-]{0,62}\.[0-9]{1,9}$"
_RULE_KEYS_TTL_S = 10.0


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Flush impressions/clicks every interval, and once more on shutdown."""
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=_counter(app).flush_s)
            await _flush(app)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        stop.set()
        await task


router = APIRouter(tags=["engagement"], lifespan=_lifespan)


# -- shared state (lazily on app.state) ---------------------------------------------

def _services(app: Any) -> Services:
    services: Services = app.state.services
    return services


def _counter(app: Any) -> EngagementCounter:
    c = getattr(app.state, "engagement", None)
    if c is None:
        s = _services(app).settings
        c = app.state.engagement = EngagementCounter(_services(app).control, s.timezone,
                                                     s.engagement_flush_s,
                                                     clock=_services(app).clock.now)
    return c


async def _flush(app: Any) -> None:
    counter = _counter(app)
    try:
        await run_in_threadpool(counter.flush)
    except Exception:  # noqa: BLE001 - counts are kept for the next flush
        log.warning("flushing banner engagement failed; will retry", exc_info=True)


def _authenticator(app: Any) -> Authenticator:
    banner_api = getattr(app.state, "banner_api", None)
    if banner_api is not None:
        shared: Authenticator = banner_api.auth
        return shared
    auth: Authenticator | None = getattr(app.state, "engagement_auth", None)
    if auth is None:
        auth = app.state.engagement_auth = _services(app).authenticator()
    return auth


def _unsubscriber(app: Any) -> Unsubscriber:
    u = getattr(app.state, "unsubscriber", None)
    if u is None:
        u = app.state.unsubscriber = _services(app).unsubscriber()
    return u


def _rule_keys(app: Any) -> set[str]:
    cached = getattr(app.state, "engagement_rule_keys", None)
    now = time.monotonic()
    if cached is not None and now - cached[0] < _RULE_KEYS_TTL_S:
        known: set[str] = cached[1]
        return known
    with _services(app).control.connect() as conn:
        keys = {r[0] for r in conn.execute(select(rules_table.c.key))}
    app.state.engagement_rule_keys = (now, keys)
    return keys


def _uid(raw: str) -> int | Response:
    try:
        return parse_user_id(raw)
    except ValueError as exc:
        return problem(422, "Invalid user id", str(exc))


def _user(request: Request, raw: str) -> int | Response:
    uid = _uid(raw)
    if isinstance(uid, Response):
        return uid
    header = request.headers.get("authorization")
    _authenticator(request.app).authorize(header.encode() if header else None, uid)
    return uid


def _split_banner_id(banner_id: str) -> tuple[str, int]:
    rule, _, episode = banner_id.rpartition(".")
    return rule, int(episode)


UserId = Annotated[str, Path(description="user id (1 .. 2**63-1)", json_schema_extra=_UID)]
BannerId = Annotated[str, Path(description="a banner's `id` (`<rule>.<episode>`)",
                               pattern=_BANNER_ID, examples=["dl-expiring.1"])]


# -- impressions and clicks ------------------------------------------------------------

Variant = Annotated[str | None, Query(
    pattern=VARIANT_KEY_RE, description="the banner's `variant` (its JSON has one when the "
    "rule has content variants): also counted per variant")]


async def _count(request: Request, user_id: str, banner_id: str, kind: str,
                 variant: str | None = None) -> Response:
    uid = _user(request, user_id)
    if isinstance(uid, Response):
        return uid
    rule, _ = _split_banner_id(banner_id)
    keys = await run_in_threadpool(_rule_keys, request.app)
    if rule not in keys:
        return problem(404, "Not found", f"no rule {rule!r}")
    counter = _counter(request.app)
    counter.add(rule, kind, variant=variant)
    if counter.flush_due():  # also without the lifespan task (e.g. a bare TestClient)
        await _flush(request.app)
    return Response(status_code=204)


_COUNT_DOC = ("Counted per rule per day (aggregated in memory, written every few seconds). "
              "Auth: the portal's service token or the user's own JWT.")


@router.post("/v1/users/{user_id}/banners/{banner_id}/impression", status_code=204,
             summary="Report that a banner was shown", description=_COUNT_DOC,
             dependencies=[Depends(bearer_scheme)], response_model=None,
             responses={204: {"description": "Counted"}, **problem_responses(401, 403, 404, 422)})
async def impression(request: Request, user_id: UserId, banner_id: BannerId,
                     variant: Variant = None) -> Response:
    return await _count(request, user_id, banner_id, "impressions", variant)


@router.post("/v1/users/{user_id}/banners/{banner_id}/click", status_code=204,
             summary="Report that a banner was clicked", description=_COUNT_DOC,
             dependencies=[Depends(bearer_scheme)], response_model=None,
             responses={204: {"description": "Counted"}, **problem_responses(401, 403, 404, 422)})
async def click(request: Request, user_id: UserId, banner_id: BannerId,
                variant: Variant = None) -> Response:
    return await _count(request, user_id, banner_id, "clicks", variant)


@router.get("/v1/rules/{key}/engagement", summary="Banner impressions and clicks per day",
            dependencies=[Depends(require("admin"))], response_model=dict[str, Any])
async def rule_engagement(
    request: Request,
    key: str,
    since: Annotated[
        date | None, Query(description="first day (default: 29 days before until)")
    ] = None,
    until: Annotated[date | None, Query(description="last day (default: today)")] = None,
) -> dict[str, Any] | Response:
    counter = _counter(request.app)
    until = until or counter.today()
    since = since or until - timedelta(days=29)
    if since > until or (until - since).days > 366:
        return problem(422, "Invalid request", "since must be before until, at most 366 days")
    days = await run_in_threadpool(counter.stats, key, since, until)
    variants = await run_in_threadpool(counter.variant_stats, key, since, until)
    return {"rule": key, "days": days, "variants": variants}


# -- why ---------------------------------------------------------------------------------

def _why(services: Services, uid: int, rule: str, episode: int) -> dict[str, Any] | None:
    ep = read_episode(services.shards.for_user(uid), uid, rule)
    if ep is None or ep["episode"] != episode:
        return None
    why = ep.get("why") or {}
    banner = ep.get("banner")
    messages = [{
        "channel": m["channel"], "status": m["status"], "reason": m.get("reason"),
        "attempts": m["attempts"], "error": m["error"], "run_id": m["run_id"],
        "created_at": _iso(m["created_at"]), "sent_at": _iso(m["sent_at"]),
        "lang": (m.get("payload") or {}).get("lang"),
        "variant": (m.get("payload") or {}).get("variant"),
    } for m in services.ledger.entries(uid, rule, episode)]
    return {
        "user_id": uid, "banner_id": f"{rule}.{episode}", "rule": rule, "episode": episode,
        "version": ep["version"], "as_of": ep["as_of"].isoformat(), "status": ep["status"],
        "lang": ep["lang"], "fields": why.get("fields", {}), "missing": why.get("missing", []),
        "error": why.get("error"), "run_id": ep["run_id"],
        "started_at": _iso(ep["started_at"]), "ended_at": _iso(ep["ended_at"]),
        "expires_at": _iso(ep["expires_at"]),
        # treatment; holdout or control: a ghost episode, nothing shown or sent
        "arm": ep.get("arm") or "treatment",
        # the content variant (channels/variants.py) it got, or a ghost would have got
        "variant": ep.get("variant"),
        "banner": None if banner is None or banner["episode"] != episode else {
            "title": banner["title"], "body": banner["body"], "link": banner["link"],
            "priority": banner["priority"], "created_at": _iso(banner["created_at"]),
            "dismissed_at": _iso(banner["dismissed_at"]), "variant": banner["variant"]},
        "messages": messages,
    }


def _iso(v: Any) -> str | None:
    return v.isoformat() if isinstance(v, datetime | date) else v


@router.get(
    "/v1/users/{user_id}/banners/{banner_id}/why",
    summary="Why does the user see this banner (admin)",
    description="The rule and version, the as-of date, the profile fields the rule read when "
                "the episode started (with their values), and the episode's e-mail/push from "
                "the ledger.",
    dependencies=[Depends(require("admin"))],
    responses=problem_responses(404, 422),
)
async def why(request: Request, user_id: UserId, banner_id: BannerId) -> Any:
    uid = _uid(user_id)
    if isinstance(uid, Response):
        return uid
    rule, episode = _split_banner_id(banner_id)
    out = await run_in_threadpool(_why, _services(request.app), uid, rule, episode)
    if out is None:
        return problem(404, "Not found", f"user {uid} has no episode {banner_id!r}")
    return out


@router.get(
    "/v1/users/{user_id}/messages",
    summary="A user's e-mail and push, from the ledger (admin)",
    dependencies=[Depends(require("admin"))],
    responses=problem_responses(422),
)
async def messages(request: Request, user_id: UserId) -> Any:
    uid = _uid(user_id)
    if isinstance(uid, Response):
        return uid
    rows = await run_in_threadpool(_services(request.app).ledger.entries, uid)
    out = []
    for m in rows:
        p = m.pop("payload", None) or {}
        out.append(
            {k: _iso(v) for k, v in m.items()} | {"why": p.get("why"), "lang": p.get("lang")}
        )
    return {"user_id": uid, "messages": out}


@router.get("/v1/deliveries", summary="Delivery outcomes per channel, and the dead letters (admin)",
            dependencies=[Depends(require("admin"))])
async def deliveries(
    request: Request,
    rule: Annotated[str | None, Query(description="only this rule")] = None,
    run_id: Annotated[int | None, Query(description="only this run")] = None,
    limit: Annotated[int, Query(ge=0, le=1000, description="dead letters listed")] = 100,
) -> dict[str, Any]:
    ledger = _services(request.app).ledger
    summary = await run_in_threadpool(ledger.summary, rule, run_id)
    dead = await run_in_threadpool(ledger.dead_letters, rule, run_id, limit)
    return {"rule": rule, "run_id": run_id, **summary, "dead_letters": dead}


# -- preferences -------------------------------------------------------------------------

class PreferencesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    channels: dict[str, bool] = Field(default_factory=dict, max_length=10,
                                      description="`email`, `push`, `banner` → allowed")
    categories: dict[str, bool] = Field(default_factory=dict, max_length=200,
                                        description="rule category → allowed (every channel)")
    channel_categories: dict[str, dict[str, bool]] = Field(
        default_factory=dict, max_length=10, description="channel → category → allowed")


_PREFS_DOC = ("Opt-outs per channel (`email`, `push`, `banner`) and per rule category; "
              "anything not named is allowed. Respected by every channel, including messages "
              "already held or being retried. Auth: the portal's service token or the user's JWT.")


@router.get("/v1/users/{user_id}/preferences", summary="A user's channel preferences",
            description=_PREFS_DOC, dependencies=[Depends(bearer_scheme)],
            responses=problem_responses(401, 403, 422))
async def get_preferences(request: Request, user_id: UserId) -> Any:
    uid = _user(request, user_id)
    if isinstance(uid, Response):
        return uid
    return await run_in_threadpool(read_preferences, _services(request.app).shards, uid)


@router.put("/v1/users/{user_id}/preferences", summary="Replace a user's channel preferences",
            description=_PREFS_DOC, dependencies=[Depends(bearer_scheme)],
            responses=problem_responses(401, 403, 422))
async def put_preferences(request: Request, user_id: UserId, body: PreferencesIn) -> Any:
    uid = _user(request, user_id)
    if isinstance(uid, Response):
        return uid
    return await run_in_threadpool(write_preferences, _services(request.app).shards, uid,
                                   body.model_dump())


@router.patch("/v1/users/{user_id}/preferences", summary="Change some of a user's preferences",
              description=_PREFS_DOC, dependencies=[Depends(bearer_scheme)],
              responses=problem_responses(401, 403, 422))
async def patch_preferences(request: Request, user_id: UserId, body: PreferencesIn) -> Any:
    uid = _user(request, user_id)
    if isinstance(uid, Response):
        return uid
    return await run_in_threadpool(merge_preferences, _services(request.app).shards, uid,
                                   body.model_dump())


# -- unsubscribe ---------------------------------------------------------------------------
#
# GET only *shows* a page with a button (mail scanners and link previews follow links
# with GET; they must not unsubscribe anyone). The button POSTs to the same URL, as
# does a mail client's RFC 8058 one-click unsubscribe (List-Unsubscribe-Post:
# List-Unsubscribe=One-Click): a POST with ``List-Unsubscribe=One-Click`` in its
# form body is what unsubscribes.

ONE_CLICK = "One-Click"
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")

_PAGES = {
    "ru": {"done": "Вы отписались", "done_body": "Вы больше не будете получать {what}.",
           "cat": "письма категории «{cat}»", "all": "письма",
           "bad": "Ссылка недействительна", "bad_body": "Эта ссылка для отписки недействительна.",
           "everything": "Отписаться от всех писем",
           "ask": "Отписаться?", "ask_body": "Вы перестанете получать {what}.",
           "button": "Отписаться"},
    "en": {"done": "You are unsubscribed", "done_body": "You will no longer receive {what}.",
           "cat": "e-mails of the category “{cat}”", "all": "e-mails",
           "bad": "Invalid link", "bad_body": "This unsubscribe link is not valid.",
           "everything": "Unsubscribe from all e-mails",
           "ask": "Unsubscribe?", "ask_body": "You will stop receiving {what}.",
           "button": "Unsubscribe"},
}


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    doc = (
        f'<!doctype html><html><head><meta charset="utf-8"><meta name="robots" content="noindex">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title></head><body><h1>{html.escape(title)}</h1>"
        f"{body}</body></html>"
    )
    return HTMLResponse(doc, status_code=status, headers={
        "Cache-Control": "no-store",
        # The token is in the URL: never send it on as a Referer.
        "Referrer-Policy": "no-referrer",
        "Content-Security-Policy": "default-src 'none'; form-action 'self'; "
                                   "frame-ancestors 'none'; base-uri 'none'",
        "X-Frame-Options": "DENY",
    })


def _lang(request: Request, default: str) -> str:
    accept = request.headers.get("accept-language", "")
    for part in accept.split(","):
        tag = part.split(";")[0].strip().lower()[:2]
        if tag in _PAGES:
            return tag
    return default if default in _PAGES else "en"


def _what(t: dict[str, str], category: str | None) -> str:
    return t["cat"].format(cat=category) if category else t["all"]


def _form(token: str, label: str) -> str:
    # A relative action: the same URL as the page (whatever prefix a proxy adds).
    return (f'<form method="post" action="{html.escape(token)}">'
            f'<input type="hidden" name="List-Unsubscribe" value="{ONE_CLICK}">'
            f'<input type="hidden" name="page" value="1">'
            f'<button type="submit">{html.escape(label)}</button></form>')


@router.get("/v1/unsubscribe/{token}",
            summary="Unsubscribe page (the link in every e-mail; no login): asks, changes nothing",
            description="Shows what the link unsubscribes from and a button that POSTs to the "
                        "same URL. Following the link alone (a mail scanner, a preview) "
                        "unsubscribes no one.",
            response_class=HTMLResponse, responses={404: {"description": "Invalid token (HTML)"}})
async def unsubscribe(request: Request, token: Annotated[str, Path(max_length=400)]) -> Response:
    unsub = _unsubscriber(request.app)
    t = _PAGES[_lang(request, unsub.default_language)]
    scope = unsub.verify(token)
    if scope is None:
        return _page(t["bad"], f"<p>{html.escape(t['bad_body'])}</p>", 404)
    body = (f"<p>{html.escape(t['ask_body'].format(what=_what(t, scope.category)))}</p>"
            + _form(token, t["button"]))
    return _page(t["ask"], body)


@router.post(
    "/v1/unsubscribe/{token}",
    summary="Unsubscribe (RFC 8058 one-click, or the page's button; no login)",
    description="The form body must carry `List-Unsubscribe=One-Click` (RFC 8058; "
                "`application/x-www-form-urlencoded` or `multipart/form-data`). Answers JSON, "
                "or an HTML page when posted from the unsubscribe page.",
    openapi_extra={"requestBody": {"required": True, "content": {
        ct: {"schema": {"type": "object", "required": ["List-Unsubscribe"], "properties": {
            "List-Unsubscribe": {"type": "string", "enum": [ONE_CLICK]},
            "page": {"type": "string", "description": "set by the unsubscribe page: "
                                                      "answer with HTML"}}}}
        for ct in _FORM_TYPES}}},
    responses={200: {"content": {"application/json": {"example": {
        "unsubscribed": {"channel": "email", "category": "documents"}}}}},
        **problem_responses(400, 404)},
)
async def unsubscribe_one_click(request: Request,
                                token: Annotated[str, Path(max_length=400)]) -> Response:
    app = request.app
    unsub = _unsubscriber(app)
    scope = unsub.verify(token)
    if scope is None:
        return problem(404, "Not found", "invalid unsubscribe token")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    form: Any = {}
    if ctype in _FORM_TYPES:
        try:
            form = await request.form(max_files=0, max_fields=10)
        except Exception:  # noqa: BLE001 - a malformed body is the client's error
            return problem(400, "Bad request", "malformed form body")
    if form.get("List-Unsubscribe") != ONE_CLICK:
        return problem(400, "Bad request",
                       "the body must be the form field List-Unsubscribe=One-Click (RFC 8058)")
    patch: dict[str, Any]  # a preferences document
    if scope.category:
        patch = {"channel_categories": {scope.channel: {scope.category: False}}}
    else:
        patch = {"channels": {scope.channel: False}}
    await run_in_threadpool(merge_preferences, _services(app).shards, scope.user_id, patch)
    log.info("user %d unsubscribed from %s/%s", scope.user_id, scope.channel, scope.category or "*")
    if not form.get("page"):
        return Response(orjson.dumps({"unsubscribed": {"channel": scope.channel,
                                                       "category": scope.category}}),
                        media_type="application/json")
    t = _PAGES[_lang(request, unsub.default_language)]
    body = f"<p>{html.escape(t['done_body'].format(what=_what(t, scope.category)))}</p>"
    if scope.category:
        # The whole channel: its own link, whose page asks again.
        everything = unsub.token(scope.user_id, scope.channel, None)
        body += f'<p><a href="{html.escape(everything)}">{html.escape(t["everything"])}</a></p>'
    return _page(t["done"], body)
