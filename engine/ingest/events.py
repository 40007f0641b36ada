"""Applying profile-update events to a profile (the schema and the parser are
engine/messages/event.py: what each operation means is documented there).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import orjson

from base.errors import EventError
from engine.messages.event import DEFAULT_SEEN_CAP, MAX_NUMBER, AnyEvent, as_instant
from shards.store import ProfileUpdate

__all__ = ["DEFAULT_SEEN_CAP", "apply_event", "apply_events", "apply_user"]


# --------------------------------------------------------------------------- apply


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


# a and b: two datetimes, or two numbers (JSON values)
def _keep_larger(a: Any, b: Any) -> bool:
    return bool(b > a)


def _keep_smaller(a: Any, b: Any) -> bool:
    return bool(b < a)


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


def _keep(
    doc: dict[str, Any], name: str, ops: dict[str, Any], keep_new: Callable[[Any, Any], bool]
) -> None:
    """``max`` / ``min``: store each value where ``keep_new(stored, value)``."""
    for path, value in ops.items():
        parent, leaf = (doc, path) if "." not in path else _parent(doc, path, create=True)
        assert parent is not None
        cur = parent.get(leaf)
        if cur is None:
            parent[leaf] = value
            continue
        a: datetime | float | None
        if isinstance(value, str):
            a = as_instant(cur) if isinstance(cur, str) else None
            if a is None:
                raise EventError(f"{name} {path}: stored value is not a date")
            b = as_instant(value)
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
    profile: dict[str, Any]
    if doc is None:
        profile, before = {}, b"{}"
    elif isinstance(doc, dict):
        profile, before = doc, orjson.dumps(doc)
    elif isinstance(doc, bytes):
        before, profile = doc, orjson.loads(doc)
    else:
        profile = orjson.loads(doc)
        before = orjson.dumps(profile)
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
            apply_event(profile, ev)
            encoded = orjson.dumps(profile)
            if len(encoded) > max_bytes:
                raise EventError(
                    f"profile would be {len(encoded)} bytes, over the {max_bytes}-byte limit"
                )
        except EventError as exc:
            rejected.append((ev, exc.reason))
            profile = orjson.loads(snapshot)
            continue
        except Exception as exc:  # noqa: BLE001 - an event that breaks the applier fails alone
            rejected.append((ev, f"cannot apply: {type(exc).__name__}: {exc}"))
            profile = orjson.loads(snapshot)
            continue
        snapshot = encoded
        seen_set.add(eid)
        seen.append(eid)
        if len(seen) > seen_cap:
            seen_set.discard(seen.pop(0))
        applied += 1
    return ProfileUpdate(profile, seen, rejected, applied, snapshot != before, snapshot)


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
