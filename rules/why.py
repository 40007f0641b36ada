""""Why do I see this?": which profile fields a rule read, with their values.

The nightly hot path (:class:`~rules.ruleset.RuleSet`) records nothing. When a
rule *enters* for a user (a new episode: a banner appears, a message goes out),
the evaluator calls :func:`explain`, which runs that one rule once more on a
*recording, read-only proxy* of the profile and returns the paths it read::

    {"fields": {"driver_license.expires_on": "2026-12-14"},
     "missing": ["vehicle"], "matched": true}

How it records: the proxy is a ``dict`` (a ``list`` for lists) holding the
profile's raw values; item access, ``get``, ``in``, iteration, ``keys``/``values``/
``items`` and ``copy`` go through overrides that note the dotted path they reached
and hand out nested values wrapped the same way. The helpers (``get(p, "a.b")``)
step through ``dict.get``/``list.__getitem__``, so they are recorded too. A path
is reported only where the rule stopped descending: reading ``orders`` and then
``orders.total`` reports ``orders.total``; testing ``if profile.get("vehicle")``
reports ``vehicle`` with its whole (size-capped) value. Paths the rule asked for
and did not find are in ``missing``.

The re-run is the same sandbox as the evaluation: the proxies are immutable (every
mutating method raises the write guard's error), and the write guard protects the
real profile underneath them as it does in :class:`~rules.ruleset.RuleSet` — so
``dict.get(profile, "devices")`` (which bypasses the proxy and returns the raw
nested dict), ``dict.values(profile)`` and anything reachable from them are
read-only too. The run always has a CPU budget (the rule's, or
:data:`~rules.sandbox.DEFAULT_BUDGET_MS` when that is 0/None).

Failures never raise: the result is ``{"error": "RuleTimeout: ...", "timeout":
True, "fields": {...}}`` for a rule stopped by the budget and ``{"error": ...,
"fields": {...}}`` for any other failure (compile error, refusal, exception), so a
caller can count them (``"error" in why``, ``why.get("timeout")``);
engine/evaluate/compose.py hands the dict on as ``extra["why"]``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import replace
from typing import Any

import orjson

from base.errors import RuleRuntimeError, RuleTimeout
from rules.budget import call_with_budget, current_slot
from rules.context import Context
from rules.sandbox import DEFAULT_BUDGET_MS, CompiledRule, compile_rule, describe_error

__all__ = ["MAX_FIELDS", "MAX_VALUE_CHARS", "RecordingDict", "RecordingList", "explain", "record"]

MAX_FIELDS = 64  # paths kept per explanation
MAX_VALUE_CHARS = 300  # a value whose JSON is longer is kept as a shortened string
_CACHE_SIZE = 256  # compiled rules kept (key, version, source)
_MISSING = object()


class _Recorder:
    __slots__ = ("reads", "missing")

    def __init__(self) -> None:
        self.reads: dict[str, Any] = {}
        self.missing: dict[str, None] = {}

    def hit(self, path: str, value: Any) -> None:
        if path not in self.reads and len(self.reads) < 4 * MAX_FIELDS:
            self.reads[path] = value

    def miss(self, path: str) -> None:
        if len(self.missing) < MAX_FIELDS:
            self.missing[path] = None


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _wrap(value: Any, path: str, rec: _Recorder) -> Any:
    t = type(value)
    if t is dict:
        return RecordingDict(value, path, rec)
    if t is list:
        return RecordingList(value, path, rec)
    return value


def _read_only(*_: Any, **__: Any) -> Any:
    # The same error the sandbox's write guard raises on the real profile.
    raise RuleRuntimeError("the profile is read-only (copy it first: dict(x) / list(x))")


class RecordingDict(dict[str, Any]):
    """A read-only dict that records the paths read through it (see the module doc)."""

    __slots__ = ("_path", "_rec")

    def __init__(self, raw: dict[str, Any], path: str, rec: _Recorder) -> None:
        dict.__init__(self, raw)
        self._path = path
        self._rec = rec

    def _get(self, key: Any, default: Any) -> Any:
        path = _join(self._path, key)
        value = dict.get(self, key, _MISSING)
        if value is _MISSING:
            self._rec.miss(path)
            return default
        self._rec.hit(path, value)
        return _wrap(value, path, self._rec)

    def __getitem__(self, key: Any) -> Any:
        value = self._get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def get(self, key: Any, default: Any = None) -> Any:
        return self._get(key, default)

    def __contains__(self, key: Any) -> bool:
        path = _join(self._path, key)
        if dict.__contains__(self, key):
            self._rec.hit(path, dict.__getitem__(self, key))
            return True
        self._rec.miss(path)
        return False

    def _all(self) -> None:
        for k, v in dict.items(self):
            self._rec.hit(_join(self._path, k), v)

    def __iter__(self) -> Any:
        self._all()
        return dict.__iter__(self)

    def keys(self) -> Any:
        self._all()
        return dict.keys(self)

    def values(self) -> Any:
        self._all()
        return [_wrap(v, _join(self._path, k), self._rec) for k, v in dict.items(self)]

    def items(self) -> Any:
        self._all()
        return [(k, _wrap(v, _join(self._path, k), self._rec)) for k, v in dict.items(self)]

    def copy(self) -> dict[str, Any]:
        self._all()
        return {k: _wrap(v, _join(self._path, k), self._rec) for k, v in dict.items(self)}

    __setitem__ = __delitem__ = _read_only
    update = pop = popitem = clear = setdefault = __ior__ = _read_only


class RecordingList(list[Any]):
    """A read-only list that records the paths read through it."""

    __slots__ = ("_path", "_rec")

    def __init__(self, raw: list[Any], path: str, rec: _Recorder) -> None:
        list.__init__(self, raw)
        self._path = path
        self._rec = rec

    def __getitem__(self, index: Any) -> Any:
        value = list.__getitem__(self, index)
        if isinstance(index, slice):
            self._rec.hit(self._path, list(self))
            return [_wrap(v, self._path, self._rec) for v in value]
        i = index if index >= 0 else len(self) + index
        path = _join(self._path, i)
        self._rec.hit(path, value)
        return _wrap(value, path, self._rec)

    def __iter__(self) -> Any:
        self._rec.hit(self._path, list.copy(self))
        return iter([_wrap(v, _join(self._path, i), self._rec)
                     for i, v in enumerate(list.__iter__(self))])

    def __contains__(self, item: Any) -> bool:
        self._rec.hit(self._path, list.copy(self))
        return list.__contains__(self, item)

    def copy(self) -> list[Any]:
        return list(self.__iter__())

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _read_only
    append = extend = insert = pop = remove = clear = sort = reverse = _read_only


def _compact(value: Any) -> Any:
    """The value as stored in an explanation: JSON types, at most ~MAX_VALUE_CHARS."""
    try:
        text = orjson.dumps(value, default=str)
    except (TypeError, orjson.JSONEncodeError):
        return str(value)[:MAX_VALUE_CHARS]
    if len(text) <= MAX_VALUE_CHARS:
        return orjson.loads(text)
    if isinstance(value, str):
        return value[: MAX_VALUE_CHARS - 1] + "…"
    return text[: MAX_VALUE_CHARS - 1].decode("utf-8", "ignore") + "…"


def _leaves(reads: dict[str, Any]) -> dict[str, Any]:
    """Paths where the rule stopped descending (no other read path extends them)."""
    paths = sorted(reads)
    out: dict[str, Any] = {}
    for i, p in enumerate(paths):
        nxt = paths[i + 1] if i + 1 < len(paths) else ""
        if nxt.startswith(p + "."):
            continue
        out[p] = _compact(reads[p])
        if len(out) >= MAX_FIELDS:
            break
    return out


def record(fn: Any, profile: Any, ctx: Any, budget_s: float | None = None) -> dict[str, Any]:
    """Run ``fn(proxy, ctx)`` and return ``{"fields", "missing", "matched"}``, or
    ``{"error", "fields"}`` (plus ``"timeout": True`` when the budget stopped it).

    ``budget_s``: CPU seconds; 0/None means the default budget, never none.
    """
    rec = _Recorder()
    proxy = _wrap(profile, "", rec) if isinstance(profile, dict | list) else profile
    budget_s = budget_s or DEFAULT_BUDGET_MS / 1000.0
    # The write guard protects the profile the slot names (and everything reachable
    # from it). call_with_budget sets it, except when nested in a running evaluation,
    # which names its own profile: set it here as well.
    slot = current_slot()
    saved = slot.profile, slot.owned
    slot.profile, slot.owned = profile, None
    try:
        matched = call_with_budget(lambda _p, c: fn(proxy, c), profile, ctx, budget_s, "why")
    except RuleTimeout as exc:
        return {"error": describe_error(exc), "timeout": True, "fields": _leaves(rec.reads)}
    except Exception as exc:  # noqa: BLE001 - an explanation must never fail the caller
        return {"error": describe_error(exc), "fields": _leaves(rec.reads)}
    finally:
        slot.profile, slot.owned = saved
    fields = _leaves(rec.reads)
    missing = [m for m in rec.missing if m not in rec.reads][:MAX_FIELDS]
    return {"fields": fields, "missing": missing, "matched": bool(matched)}


_cache: OrderedDict[tuple[str, int, int], CompiledRule] = OrderedDict()
_lock = threading.Lock()


def _compiled(key: str, version: int, source: str, budget_ms: float) -> CompiledRule:
    ck = (key, version, hash(source))
    with _lock:
        hit = _cache.get(ck)
        if hit is not None:
            _cache.move_to_end(ck)
            return hit
    compiled = compile_rule(source, key, budget_ms)
    with _lock:
        _cache[ck] = compiled
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return compiled


def explain(key: str, version: int, source: str, profile: Any, ctx: Context,
            budget_ms: float = 50.0) -> dict[str, Any]:
    """Which fields the rule ``key`` (at ``version``, with ``source``) read on ``profile``."""
    try:
        compiled = _compiled(key, version, source, budget_ms)
    except Exception as exc:  # noqa: BLE001
        return {"error": describe_error(exc), "fields": {}}
    if isinstance(ctx, Context) and (ctx.rule_key != key or ctx.rule_version != version):
        ctx = replace(ctx, rule_key=key, rule_version=version)
    return record(compiled.raw, profile, ctx, budget_ms / 1000.0)
