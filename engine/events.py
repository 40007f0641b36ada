"""Profile-update events: the schema and what each operation does.

An event carries one or more operations, applied in this order::

    {"event_id": "e-1", "user_id": 42, "ts": "2026-11-22T10:00:00Z",
     "set":    {"driver_license": {"expires_on": "2027-01-10"}},   # deep merge
     "unset":  ["vehicle.plate"],                                   # remove paths
     "inc":    {"orders.total": 1},                                 # add to numbers
     "append": {"orders.recent": {"value": {"id": 7}, "cap": 20}},  # capped list
     "max":    {"orders.last_at": "2026-11-22"},                    # keep the larger
     "min":    {"first_seen": "2020-01-01"}}                        # keep the smaller

* ``set`` deep-merges objects: an object value merges into an existing object, any
  other value replaces what was there. Keys may be dotted (``"a.b": 1`` is
  ``{"a": {"b": 1}}``).
* ``unset`` removes dotted paths; a missing path is not an error.
* ``inc`` adds a number at a dotted path (a missing path starts at 0).
* ``append`` adds a value to the list at a path, keeping only the last ``cap``
  items (default 20, at most 1000).
* ``max`` / ``min`` keep the larger / smaller of the stored and the given value;
  numbers compare as numbers, strings as ISO dates or datetimes.

A path that runs into a non-object (``inc`` into ``"a.b"`` where ``a`` is a
number), or an operation on the wrong type, makes the *event* fail: it is
dead-lettered with the cause and the user's other events still apply.
"""

from __future__ import annotations

import math
import re
from datetime import date, datetime
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kvadrupel.errors import EventError
from shards.router import parse_user_id

__all__ = ["Event", "apply_event", "apply_events", "parse_event"]

_PATH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*(\.[A-Za-z0-9][A-Za-z0-9_\-]*){0,15}$")
MAX_NUMBER = 2**63 - 1
APPEND_CAP_DEFAULT = 20
APPEND_CAP_MAX = 1000

Path = Annotated[str, Field(min_length=1, max_length=256, pattern=_PATH_RE.pattern)]
Number = int | float


def _check_number(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError("must be a number")
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError("must be a finite number")
    if abs(v) > MAX_NUMBER:
        raise ValueError("number out of range (|n| <= 2**63-1)")
    return v


class AppendOp(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    value: Any
    cap: int = Field(default=APPEND_CAP_DEFAULT, ge=1, le=APPEND_CAP_MAX)


class Event(BaseModel):
    """One profile update. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: str = Field(min_length=1, max_length=128)
    user_id: int
    ts: datetime | None = None
    set: dict[str, Any] | None = None
    unset: list[Path] | None = None
    inc: dict[Path, Any] | None = None
    append: dict[Path, AppendOp] | None = None
    max: dict[Path, Any] | None = None
    min: dict[Path, Any] | None = None

    @field_validator("user_id", mode="before")
    @classmethod
    def _uid(cls, v: Any) -> int:
        return parse_user_id(v)

    @field_validator("set")
    @classmethod
    def _set_keys(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            for key in v:
                if not _PATH_RE.match(key):
                    raise ValueError(f"bad key {key!r}: use letters, digits, '_', '-' and dots")
        return v

    @field_validator("inc")
    @classmethod
    def _inc_numbers(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            for path, n in v.items():
                try:
                    _check_number(n)
                except ValueError as exc:
                    raise ValueError(f"inc {path}: {exc}") from None
        return v

    @field_validator("max", "min")
    @classmethod
    def _comparable(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            for path, x in v.items():
                if isinstance(x, str):
                    if _as_datetime(x) is None:
                        raise ValueError(f"{path}: strings must be ISO dates or datetimes")
                else:
                    try:
                        _check_number(x)
                    except ValueError as exc:
                        raise ValueError(f"{path}: {exc}") from None
        return v

    @model_validator(mode="after")
    def _has_op(self) -> Event:
        if not any((self.set, self.unset, self.inc, self.append, self.max, self.min)):
            raise ValueError("an event needs at least one operation: set, unset, inc, append, max, min")
        return self


def parse_event(raw: bytes | str | dict[str, Any]) -> Event:
    """Validate one event; raise EventError with a readable reason."""
    try:
        data = raw if isinstance(raw, dict) else orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EventError(f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise EventError("an event must be a JSON object")
    try:
        return Event.model_validate(data)
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        raise EventError(_describe(exc)) from None


def _describe(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if errors is None:
        return str(exc)
    parts = []
    for err in errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts)


# --------------------------------------------------------------------------- apply
def _as_datetime(s: str) -> datetime | None:
    try:
        if len(s) == 10:
            return datetime.combine(date.fromisoformat(s), datetime.min.time())
        dt = datetime.fromisoformat(s)
        return dt.replace(tzinfo=None) if dt.tzinfo is None else dt.astimezone().replace(tzinfo=None)
    except ValueError:
        return None


def _parent(doc: dict[str, Any], path: str, create: bool) -> tuple[dict[str, Any] | None, str]:
    parts = path.split(".")
    node: Any = doc
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            if not create:
                return None, parts[-1]
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            raise EventError(f"path {path}: {'.'.join(parts[: i + 1])} is not an object")
        node = nxt
    return node, parts[-1]


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if "." in key:
            parent, leaf = _parent(target, key, create=True)
            assert parent is not None
            key, target_ = leaf, parent
        else:
            target_ = target
        if isinstance(value, dict):
            cur = target_.get(key)
            if isinstance(cur, dict):
                _merge(cur, value)
            else:
                fresh: dict[str, Any] = {}
                _merge(fresh, value)
                target_[key] = fresh
        else:
            target_[key] = value


def apply_event(doc: dict[str, Any], ev: Event) -> None:
    """Apply one event to ``doc`` in place. Raises EventError; ``doc`` may then be
    partly modified, so callers keep a snapshot (see :func:`apply_events`)."""
    if ev.set:
        _merge(doc, ev.set)
    if ev.unset:
        for path in ev.unset:
            parent, leaf = _parent(doc, path, create=False)
            if parent is not None:
                parent.pop(leaf, None)
    if ev.inc:
        for path, n in ev.inc.items():
            parent, leaf = _parent(doc, path, create=True)
            assert parent is not None
            cur = parent.get(leaf, 0)
            if isinstance(cur, bool) or not isinstance(cur, int | float):
                raise EventError(f"inc {path}: stored value is not a number")
            new = cur + n
            if abs(new) > MAX_NUMBER:
                raise EventError(f"inc {path}: result out of range")
            parent[leaf] = new
    if ev.append:
        for path, op in ev.append.items():
            parent, leaf = _parent(doc, path, create=True)
            assert parent is not None
            cur = parent.get(leaf)
            if cur is None:
                cur = parent[leaf] = []
            elif not isinstance(cur, list):
                raise EventError(f"append {path}: stored value is not a list")
            cur.append(op.value)
            if len(cur) > op.cap:
                del cur[: len(cur) - op.cap]
    for name, ops, keep_new in (("max", ev.max, lambda a, b: b > a), ("min", ev.min, lambda a, b: b < a)):
        if not ops:
            continue
        for path, value in ops.items():
            parent, leaf = _parent(doc, path, create=True)
            assert parent is not None
            cur = parent.get(leaf)
            if cur is None:
                parent[leaf] = value
                continue
            if isinstance(value, str):
                a = _as_datetime(cur) if isinstance(cur, str) else None
                if a is None:
                    raise EventError(f"{name} {path}: stored value is not a date")
                b = _as_datetime(value)
            else:
                if isinstance(cur, bool) or not isinstance(cur, int | float):
                    raise EventError(f"{name} {path}: stored value is not a number")
                a, b = cur, value
            if keep_new(a, b):
                parent[leaf] = value


def apply_events(
    doc: dict[str, Any] | None,
    seen: list[str],
    events: list[Event],
    *,
    max_bytes: int,
    seen_cap: int = 64,
) -> tuple[dict[str, Any], list[str], list[tuple[Event, str]], int]:
    """Apply a user's events in order, skipping ids in ``seen``.

    Returns ``(doc, seen, rejected, applied)``: the new document, the updated list of
    recent event ids, the events refused with their reason, and how many applied.
    A refused event leaves no trace: the document is as if it never arrived.
    """
    doc = {} if doc is None else doc
    seen_set = set(seen)
    rejected: list[tuple[Event, str]] = []
    applied = 0
    snapshot = orjson.dumps(doc)
    for ev in events:
        if ev.event_id in seen_set:
            continue
        try:
            apply_event(doc, ev)
            size = len(orjson.dumps(doc))
            if size > max_bytes:
                raise EventError(f"profile would be {size} bytes, over the {max_bytes}-byte limit")
        except EventError as exc:
            rejected.append((ev, exc.reason))
            doc = orjson.loads(snapshot)
            continue
        snapshot = orjson.dumps(doc)
        seen_set.add(ev.event_id)
        seen.append(ev.event_id)
        applied += 1
    if len(seen) > seen_cap:
        seen = seen[-seen_cap:]
    return doc, seen, rejected, applied
