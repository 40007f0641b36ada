"""``POST /v1/events``: validate, then queue durably; 202 only once the bus has them.

Validation is all or nothing: every event is checked (schema, size, and the
request's own events per user applied in order to an empty profile, which finds
paths into non-objects and type clashes the request makes itself); one bad event
→ 422 with the reason per event, and nothing of the request is queued.

Durability: the events of concurrent requests are published and flushed in
groups by one publisher thread (group commit, :mod:`engine.ingest.publisher`). A
group is acknowledged only after ``flush`` confirmed every message of it; if
anything in the group failed, every request of the group gets 503 and retries,
which is harmless: an ``event_id`` already applied to a profile is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from api.auth import require
from api.problems import problem
from api.services import Services
from base.errors import BusError, EventError
from engine.ingest.events import apply_user
from engine.ingest.publisher import GroupPublisher
from engine.messages.event import MAX_DEPTH, parse_event

router = APIRouter(tags=["ingest"])
log = logging.getLogger("kvadrupel.api.events")
MAX_EVENTS = 10_000
MAX_BODY_BYTES = 16 * 1024 * 1024
TOO_DEEP = f"nested too deeply (an event's values may be nested at most {MAX_DEPTH} levels)"


_publishers_lock = threading.Lock()


def _publisher(request: Request) -> GroupPublisher:
    state = request.app.state
    pub = getattr(state, "event_publisher", None)
    if pub is None:
        with _publishers_lock:
            pub = getattr(state, "event_publisher", None)
            if pub is None:
                services: Services = state.services
                pub = GroupPublisher(services.bus, services.bus.topic("events"))
                services.add_closer(pub.close)
                state.event_publisher = pub
    return pub


def _check_request(items: list[Any], max_bytes: int) -> tuple[list[Any], list[dict[str, Any]]]:
    """Validate every event; then apply each user's events of this request, in
    order, to an empty profile: what fails there fails whatever is stored."""
    events: list[tuple[int, Any]] = []
    errors: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        try:
            if not isinstance(item, dict):
                raise EventError("an event must be a JSON object")
            events.append((i, parse_event(item, max_bytes=max_bytes)))
        except EventError as exc:
            errors.append({"index": i, "reason": exc.reason})
        except orjson.JSONEncodeError:
            # Parsed JSON that cannot be written back: nested deeper than orjson
            # writes (254 levels; reading allows 1024). No event is anywhere near it.
            errors.append({"index": i, "reason": TOO_DEEP})
    per_user: dict[int, list[Any]] = {}
    for _, ev in events:
        per_user.setdefault(ev.user_id, []).append(ev)
    index = {id(ev): i for i, ev in events}
    for evs in per_user.values():
        for ev, reason in apply_user(None, [], evs, max_bytes=max_bytes).rejected:
            errors.append({"index": index[id(ev)], "reason": reason})
    errors.sort(key=lambda e: e["index"])
    return [ev for _, ev in events], errors


@router.post(
    "/v1/events",
    status_code=202,
    dependencies=[Depends(require("ingest"))],
    summary="Submit profile-update events",
    description=(
        "Body: one event object, a JSON array of events, or `{\"events\": [...]}` (at most "
        f"{MAX_EVENTS:,} events, {MAX_BODY_BYTES // 2**20} MiB). Every event is validated first "
        "(schema, size, and the request's own events per user applied in order); if any is "
        "invalid the response is 422 with the reason per event and nothing is queued. 202 "
        "means every event is durably on the bus. Retrying a request (same `event_id`s) is "
        "harmless: an event id already applied to the user's profile is skipped."
    ),
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {
                    "schema": {"type": "object"},
                    "example": {
                        "event_id": "e-1",
                        "user_id": 42,
                        "set": {"driver_license": {"expires_on": "2026-12-12"}},
                    },
                }
            },
            "required": True,
        }
    },
    responses={202: {"content": {"application/json": {"example": {"accepted": 1}}}}},
)
async def post_events(request: Request) -> Response:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        return problem(413, "Payload too large", f"at most {MAX_BODY_BYTES} bytes per request")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return problem(422, "Invalid request", f"malformed JSON: {exc}")
    if isinstance(data, dict) and "events" in data and "event_id" not in data:
        if set(data) != {"events"}:
            return problem(422, "Invalid request", "unknown top-level fields besides 'events'")
        data = data["events"]
    items = data if isinstance(data, list) else [data]
    if not items:
        return problem(422, "Invalid request", "no events")
    if len(items) > MAX_EVENTS:
        return problem(413, "Payload too large", f"at most {MAX_EVENTS} events per request")
    max_bytes = request.app.state.services.settings.profile_max_bytes
    if len(items) > 100:  # keep the event loop free for big requests
        events, errors = await asyncio.to_thread(_check_request, items, max_bytes)
    else:
        events, errors = _check_request(items, max_bytes)
    if errors:
        detail = "; ".join(f"event {e['index']}: {e['reason']}" for e in errors[:20])
        return problem(422, "Invalid events", detail, errors=errors)
    # The original JSON of each event is queued: the worker validates it again
    # with the same rules.
    messages = [(orjson.dumps(item), str(ev.user_id).encode())
                for item, ev in zip(items, events, strict=True)]
    try:
        await asyncio.wrap_future(_publisher(request).submit(messages))
    except BusError as exc:
        r = problem(503, "Service unavailable", f"events not queued: {exc}")
        r.headers["Retry-After"] = "1"
        return r
    return Response(orjson.dumps({"accepted": len(events)}), status_code=202,
                    media_type="application/json")
