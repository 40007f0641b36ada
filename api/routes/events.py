"""``POST /v1/events``: validate, then queue durably; 202 only once the bus has them."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from api.auth import require
from api.problems import problem
from engine.events import parse_event
from kvadrupel.errors import BusError, EventError

router = APIRouter(tags=["ingest"])
MAX_EVENTS = 10_000


@router.post(
    "/v1/events",
    status_code=202,
    dependencies=[Depends(require("ingest"))],
    summary="Submit profile-update events",
    description=(
        "Body: one event object, a JSON array of events, or `{\"events\": [...]}`. Every event "
        "is validated first; if any is invalid the response is 422 with the reason per event "
        "and nothing is queued. 202 means every event is durably on the bus."
    ),
    openapi_extra={"requestBody": {"content": {"application/json": {"schema": {"type": "object"},
        "example": {"event_id": "e-1", "user_id": 42, "set": {"driver_license": {"expires_on": "2026-12-12"}}}}},
        "required": True}},
    responses={202: {"content": {"application/json": {"example": {"accepted": 1}}}}},
)
async def post_events(request: Request) -> Response:
    raw = await request.body()
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
    events, errors = [], []
    for i, item in enumerate(items):
        try:
            events.append(parse_event(item if isinstance(item, dict) else orjson.dumps(item)))
        except EventError as exc:
            errors.append({"index": i, "reason": exc.reason})
    if errors:
        detail = "; ".join(f"event {e['index']}: {e['reason']}" for e in errors[:20])
        return problem(422, "Invalid events", detail, errors=errors)
    bus = request.app.state.container.bus
    topic = bus.topic("events")
    try:
        for ev in events:
            bus.publish(topic, orjson.dumps(ev.model_dump(mode="json", exclude_none=True)),
                        key=str(ev.user_id).encode())
        bus.flush(10.0)
    except BusError as exc:
        r = problem(503, "Service unavailable", f"events not queued: {exc}")
        r.headers["Retry-After"] = "1"
        return r
    return Response(orjson.dumps({"accepted": len(events)}), status_code=202,
                    media_type="application/json")
