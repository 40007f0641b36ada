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
  numbers compare as numbers, strings as ISO dates or datetimes (as instants;
  a date or a datetime without offset is taken as UTC).

Validation (:func:`parse_event`) refuses unknown fields and operations, wrong
types, numbers beyond ±(2**63-1), values nested deeper than :data:`MAX_DEPTH`,
strings containing NUL (PostgreSQL's JSONB cannot store it), and events larger
than the profile size limit. The pydantic model :class:`Event` is the schema;
the hot path validates most events with a hand-written check that accepts only
what the model accepts and builds the same values, and hands everything else to
the model (``tests/engine/test_events.py`` checks the two agree).

A path that runs into a non-object (``inc`` into ``"a.b"`` where ``a`` is a
number), an operation on the wrong stored type, or a result over the profile
size limit makes the *event* fail when applied: it is dead-lettered with the
cause and leaves no trace; the user's other events still apply.

Duplicates: each profile keeps the ids of the last ``seen_cap`` (default 64)
events applied to it; an event whose id is among them is skipped. Event ids are
therefore scoped per user, and a retry is recognised as long as fewer than
``seen_cap`` other events of that user were applied in between.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, date, datetime
from typing import Annotated, Any, NamedTuple

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from base.errors import EventError
from shards.router import MAX_USER_ID, parse_user_id

__all__ = ["APPEND_CAP_DEFAULT", "APPEND_CAP_MAX", "DEFAULT_SEEN_CAP", "MAX_DEPTH", "AnyEvent",
           "Append", "AppendOp", "Event", "FastEvent", "MAX_NUMBER", "as_instant",
           "parse_event"]

_PATH_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_\-]*(\.[A-Za-z0-9][A-Za-z0-9_\-]*){0,15}$"
# fullmatch, not match: Python's "$" also matches before a trailing newline.
_path_match = re.compile(_PATH_PATTERN).fullmatch
_good_paths: set[str] = set()  # paths seen valid (events reuse a few): skips the regex


def _path_ok(p: str) -> bool:
    if p in _good_paths:
        return True
    if not _path_match(p):
        return False
    if len(_good_paths) >= 4096:
        _good_paths.clear()
    _good_paths.add(p)
    return True

MAX_NUMBER = 2**63 - 1
MAX_PATH = 256
MAX_EVENT_ID = 128
MAX_DEPTH = 32  # objects/arrays nested in one value
APPEND_CAP_DEFAULT = 20
APPEND_CAP_MAX = 1000
DEFAULT_SEEN_CAP = 64
_OPS = ("set", "unset", "inc", "append", "max", "min")
_FIELDS = frozenset(("event_id", "user_id", "ts", *_OPS))
_DICT_OPS = frozenset(("set", "inc", "append", "max", "min"))
_APPEND_KEYS = frozenset(("value", "cap"))

Path = Annotated[str, Field(min_length=1, max_length=MAX_PATH, pattern=_PATH_PATTERN)]


def _check_number(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError("must be a number")
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError("must be a finite number")
    if abs(v) > MAX_NUMBER:
        raise ValueError("number out of range (|n| <= 2**63-1)")
    return v


def _check_tree(v: Any, where: str, depth: int = 0) -> None:
    """No NUL in any string or key, at most MAX_DEPTH levels of nesting."""
    if isinstance(v, str):
        if "\x00" in v:
            raise ValueError(f"{where}: strings must not contain NUL (\\u0000)")
    elif isinstance(v, dict):
        if depth >= MAX_DEPTH:
            raise ValueError(f"{where}: nested deeper than {MAX_DEPTH} levels")
        for k, x in v.items():
            if "\x00" in k:
                raise ValueError(f"{where}: keys must not contain NUL (\\u0000)")
            _check_tree(x, where, depth + 1)
    elif isinstance(v, list):
        if depth >= MAX_DEPTH:
            raise ValueError(f"{where}: nested deeper than {MAX_DEPTH} levels")
        for x in v:
            _check_tree(x, where, depth + 1)


def _check_comparable(path: str, x: Any) -> None:
    if isinstance(x, str):
        if as_instant(x) is None:
            raise ValueError(f"{path}: strings must be ISO dates or datetimes")
    else:
        try:
            _check_number(x)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


class AppendOp(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    value: Any
    cap: int = Field(default=APPEND_CAP_DEFAULT, ge=1, le=APPEND_CAP_MAX)


class Event(BaseModel):
    """One profile update (the schema). Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: str = Field(min_length=1, max_length=MAX_EVENT_ID)
    user_id: int
    ts: datetime | None = None
    set: dict[str, Any] | None = None
    unset: list[Path] | None = None
    inc: dict[Path, Any] | None = None
    append: dict[Path, AppendOp] | None = None
    max: dict[Path, Any] | None = None
    min: dict[Path, Any] | None = None

    @field_validator("event_id")
    @classmethod
    def _eid(cls, v: str) -> str:
        if "\x00" in v:
            raise ValueError("must not contain NUL (\\u0000)")
        return v

    @field_validator("user_id", mode="before")
    @classmethod
    def _uid(cls, v: Any) -> int:
        return parse_user_id(v)

    @field_validator("set")
    @classmethod
    def _set_keys(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            for key, value in v.items():
                if len(key) > MAX_PATH or not _path_ok(key):
                    raise ValueError(f"bad key {key!r}: use letters, digits, '_', '-' and dots")
                _check_tree(value, key)
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

    @field_validator("append")
    @classmethod
    def _append_values(cls, v: dict[str, AppendOp] | None) -> dict[str, AppendOp] | None:
        if v is not None:
            for path, op in v.items():
                _check_tree(op.value, path)
        return v

    @field_validator("max", "min")
    @classmethod
    def _comparable(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            for path, x in v.items():
                _check_comparable(path, x)
        return v

    @model_validator(mode="after")
    def _has_op(self) -> Event:
        if not any((self.set, self.unset, self.inc, self.append, self.max, self.min)):
            raise ValueError(
                "an event needs at least one operation: set, unset, inc, append, max, min"
            )
        return self


class Append(NamedTuple):
    value: Any
    cap: int


class FastEvent:
    """An event validated by the fast path: the same attributes as :class:`Event`
    (``append`` values are :class:`Append` tuples), without pydantic's overhead."""

    __slots__ = ("event_id", "user_id", "ts", "set", "unset", "inc", "append", "max", "min")

    def __init__(
        self, event_id: str, user_id: int, ts: datetime | None, ops: dict[str, Any]
    ) -> None:
        self.event_id = event_id
        self.user_id = user_id
        self.ts = ts
        self.set = ops.get("set")
        self.unset = ops.get("unset")
        self.inc = ops.get("inc")
        self.append = ops.get("append")
        self.max = ops.get("max")
        self.min = ops.get("min")

    def model_dump(self) -> dict[str, Any]:
        """The same dict ``Event.model_dump()`` gives (tests compare the two paths)."""
        out = {s: getattr(self, s) for s in self.__slots__}
        if self.append is not None:
            out["append"] = {p: {"value": a.value, "cap": a.cap} for p, a in self.append.items()}
        return out

    def __repr__(self) -> str:
        return f"FastEvent({self.event_id!r}, user {self.user_id})"


AnyEvent = Event | FastEvent
# The model's own datetime validation (same result), without TypeAdapter's wrapper.
_ts_validate = TypeAdapter(datetime).validator.validate_python


def _fast(data: dict[str, Any]) -> FastEvent | None:
    """Validate the common shapes by hand; None means "ask the model" (which then
    accepts with the same values or refuses with the reason). Never refuses."""
    ev = FastEvent.__new__(FastEvent)
    ev.ts = ev.set = ev.unset = ev.inc = ev.append = ev.max = ev.min = None
    eid = uid = None
    some = False
    try:
        for name, v in data.items():
            if name == "event_id":
                eid = v
            elif name == "user_id":
                uid = v
            elif v is None:
                if name not in _FIELDS:
                    return None
            elif name == "ts":
                ev.ts = _ts_validate(v)
            elif name == "unset":
                if type(v) is not list:
                    return None
                for p in v:
                    if type(p) is not str or len(p) > MAX_PATH or not _path_ok(p):
                        return None
                ev.unset = v
                some = some or bool(v)
            elif name in _DICT_OPS:
                if type(v) is not dict:
                    return None
                for p in v:
                    if type(p) is not str or len(p) > MAX_PATH or not _path_ok(p):
                        return None
                if name == "set":
                    for p, x in v.items():
                        if type(x) is dict or type(x) is list or type(x) is str:
                            _check_tree(x, p)
                    ev.set = v
                elif name == "inc":
                    for x in v.values():
                        _check_number(x)
                    ev.inc = v
                elif name == "append":
                    out = {}
                    for p, op in v.items():
                        if (type(op) is not dict or "value" not in op
                                or not _APPEND_KEYS.issuperset(op)):
                            return None
                        cap = op.get("cap", APPEND_CAP_DEFAULT)
                        if type(cap) is not int or not 1 <= cap <= APPEND_CAP_MAX:
                            return None
                        _check_tree(op["value"], p)
                        out[p] = Append(op["value"], cap)
                    ev.append = out
                else:
                    for p, x in v.items():
                        _check_comparable(p, x)
                    setattr(ev, name, v)
                some = some or bool(v)
            else:
                return None
    except ValueError:
        return None
    if (type(eid) is not str or not 0 < len(eid) <= MAX_EVENT_ID or "\x00" in eid or not some):
        return None
    if type(uid) is not int or not 0 < uid <= MAX_USER_ID:
        if type(uid) is not str:
            return None
        try:
            uid = parse_user_id(uid)
        except ValueError:
            return None
    ev.event_id = eid
    ev.user_id = uid
    return ev


def parse_event(raw: bytes | str | dict[str, Any], *, max_bytes: int | None = None) -> AnyEvent:
    """Validate one event; raise EventError with a readable reason.

    ``max_bytes``: refuse an event whose JSON is larger (it could never fit in a
    profile of that size).
    """
    if isinstance(raw, dict):
        data = raw
        if max_bytes is not None and len(orjson.dumps(data)) > max_bytes:
            raise EventError(f"event larger than the {max_bytes}-byte profile limit")
    else:
        if max_bytes is not None and len(raw) > max_bytes:
            raise EventError(f"event larger than the {max_bytes}-byte profile limit")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise EventError(f"malformed JSON: {exc}") from None
        if not isinstance(data, dict):
            raise EventError("an event must be a JSON object")
    ev = _fast(data)
    if ev is not None:
        return ev
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


_instants: dict[str, datetime | None] = {}  # recent answers of as_instant (dates repeat)


def as_instant(s: str) -> datetime | None:
    """An ISO date or datetime as a naive UTC datetime (naive input is taken as
    UTC), so that comparisons do not depend on the machine's time zone."""
    try:
        return _instants[s]
    except KeyError:
        pass
    try:
        if len(s) == 10:
            dt = datetime.combine(date.fromisoformat(s), datetime.min.time())
        else:
            dt = datetime.fromisoformat(s)
            if dt.tzinfo is not None:
                dt = dt.astimezone(UTC).replace(tzinfo=None)
    except ValueError:
        dt = None
    if len(_instants) >= 4096:
        _instants.clear()
    _instants[s] = dt
    return dt
