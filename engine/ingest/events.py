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
from collections.abc import Sequence
from datetime import UTC, date, datetime
from typing import Annotated, Any, NamedTuple

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from base.errors import EventError
from shards.router import MAX_USER_ID, parse_user_id
from shards.store import ProfileUpdate

__all__ = [
    "Event",
    "FastEvent",
    "apply_event",
    "apply_events",
    "apply_user",
    "parse_event",
]

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
        if _as_datetime(x) is None:
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


# --------------------------------------------------------------------------- apply
_instants: dict[str, datetime | None] = {}  # recent answers of _as_datetime (dates repeat)


def _as_datetime(s: str) -> datetime | None:
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


_split_paths: dict[str, tuple[list[str], str]] = {}  # dotted path -> (heads, leaf)


def _parent(doc: dict[str, Any], path: str, create: bool) -> tuple[dict[str, Any] | None, str]:
    if "." not in path:
        return doc, path
    split = _split_paths.get(path)  # events reuse a few paths: split each once
    if split is None:
        parts = path.split(".")
        split = (parts[:-1], parts[-1])
        if len(_split_paths) >= 4096:
            _split_paths.clear()
        _split_paths[path] = split
    heads, leaf = split
    node: Any = doc
    for i, part in enumerate(heads):
        nxt = node.get(part)
        if nxt is None:
            if not create:
                return None, leaf
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            raise EventError(f"path {path}: {'.'.join(heads[: i + 1])} is not an object")
        node = nxt
    return node, leaf


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


def _keep_larger(a: Any, b: Any) -> bool:
    return b > a


def _keep_smaller(a: Any, b: Any) -> bool:
    return b < a


def apply_event(doc: dict[str, Any], ev: AnyEvent) -> None:
    """Apply one event to ``doc`` in place. Raises EventError; ``doc`` may then be
    partly modified, so callers keep a snapshot (see :func:`apply_user`)."""
    if ev.set:
        _merge(doc, ev.set)
    if ev.unset:
        for path in ev.unset:
            parent, leaf = _parent(doc, path, create=False)
            if parent is not None:
                parent.pop(leaf, None)
    if ev.inc:
        for path, n in ev.inc.items():
            parent, leaf = (doc, path) if "." not in path else _parent(doc, path, create=True)
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
            parent, leaf = (doc, path) if "." not in path else _parent(doc, path, create=True)
            assert parent is not None
            cur = parent.get(leaf)
            if cur is None:
                cur = parent[leaf] = []
            elif not isinstance(cur, list):
                raise EventError(f"append {path}: stored value is not a list")
            cur.append(op.value)
            if len(cur) > op.cap:
                del cur[: len(cur) - op.cap]
    if ev.max:
        _keep(doc, "max", ev.max, _keep_larger)
    if ev.min:
        _keep(doc, "min", ev.min, _keep_smaller)


def _keep(doc: dict[str, Any], name: str, ops: dict[str, Any], keep_new: Any) -> None:
    """``max`` / ``min``: store each value where ``keep_new(stored, value)``."""
    for path, value in ops.items():
        parent, leaf = (doc, path) if "." not in path else _parent(doc, path, create=True)
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
        try:
            newer = keep_new(a, b)
        except TypeError:  # an aware and a naive datetime
            raise EventError(f"{name} {path}: cannot compare {cur!r} with {value!r}") from None
        if newer:
            parent[leaf] = value


def apply_user(
    doc: dict[str, Any] | bytes | str | None,
    seen: list[str] | None,
    events: Sequence[AnyEvent],
    *,
    max_bytes: int,
    seen_cap: int = DEFAULT_SEEN_CAP,
) -> ProfileUpdate:
    """Apply one user's events in order, skipping ids in ``seen``.

    ``doc`` is the stored document: a dict (changed in place), its JSON text, or
    orjson bytes (as :attr:`ProfileUpdate.encoded`; no re-serialisation needed).
    Equal to applying the events one at a time: a refused event (wrong type, path
    into a non-object, result over ``max_bytes``) leaves no trace. One
    serialisation per event serves as the size check, the rollback snapshot and,
    for the last one, the bytes to store.
    """
    if doc is None:
        doc, before = {}, b"{}"
    elif isinstance(doc, dict):
        before = orjson.dumps(doc)
    elif isinstance(doc, bytes):
        before, doc = doc, orjson.loads(doc)
    else:
        doc = orjson.loads(doc)
        before = orjson.dumps(doc)
    snapshot = before
    # The window is exact at every event (not per batch): otherwise what counts as
    # a duplicate would depend on where the batches were cut.
    if not seen:
        seen, seen_set = [], set()
    else:
        seen_set = set(seen)
        if len(seen_set) == len(seen) <= seen_cap:
            seen = list(seen)  # a copy: the caller's list (a cache's) must not change
        else:
            seen = list(dict.fromkeys(seen))[-seen_cap:]
            seen_set = set(seen)
    rejected: list[tuple[AnyEvent, str]] = []
    applied = 0
    for ev in events:
        eid = ev.event_id
        if eid in seen_set:
            continue
        try:
            apply_event(doc, ev)
            encoded = orjson.dumps(doc)
            if len(encoded) > max_bytes:
                raise EventError(
                    f"profile would be {len(encoded)} bytes, over the {max_bytes}-byte limit"
                )
        except EventError as exc:
            rejected.append((ev, exc.reason))
            doc = orjson.loads(snapshot)
            continue
        except Exception as exc:  # noqa: BLE001 - an event that breaks the applier fails alone
            rejected.append((ev, f"cannot apply: {type(exc).__name__}: {exc}"))
            doc = orjson.loads(snapshot)
            continue
        snapshot = encoded
        seen_set.add(eid)
        seen.append(eid)
        if len(seen) > seen_cap:
            seen_set.discard(seen.pop(0))
        applied += 1
    return ProfileUpdate(doc, seen, rejected, applied, snapshot != before, snapshot)


def apply_events(
    doc: dict[str, Any] | None,
    seen: list[str],
    events: list[AnyEvent],
    *,
    max_bytes: int,
    seen_cap: int = DEFAULT_SEEN_CAP,
) -> tuple[dict[str, Any], list[str], list[tuple[AnyEvent, str]], int]:
    """:func:`apply_user` as ``(doc, seen, rejected, applied)``."""
    u = apply_user(doc, seen, events, max_bytes=max_bytes, seen_cap=seen_cap)
    return u.doc, u.seen, u.rejected, u.applied
