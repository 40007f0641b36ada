"""A set of rules evaluated together: the nightly evaluator's hot path.

All rules of a :class:`RuleSet` are called from ONE generated function (see
:func:`_generate`): per profile there is one call, one ``try`` per rule (free in
Python 3.11 unless something is raised) and one list store per rule to tell the
watchdog which rule runs (rules/budget.py). Per-rule contexts are built once per
``ctx`` and cached. The profile is protected by the write guard (rules/guards.py),
which costs nothing unless a rule tries to write.

``RuleSet(..., horizons=True)`` compiles the rules for time horizons
(rules/horizon.py): the generated evaluator then also resets the calling thread's
horizon recorder before each rule and reads it after, and every
:class:`Outcome` carries ``horizons``. Its tracked contexts are built per thread
(their ``today`` holds that thread's recorder). The default evaluator is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import date
from typing import Any

from base.errors import RuleCompileError
from rules.budget import WATCHDOG, BudgetExceeded, Slot, clear_async_exc, current_slot
from rules.context import Context
from rules.horizon import NEVER, describe_tracked, offset_date, track_context
from rules.horizon import _rec as horizon_recorder
from rules.horizon_policy import TIMELESS, Untrackable
from rules.sandbox import compile_rule, describe_error

__all__ = ["Horizons", "Outcome", "RuleSet", "RuleSpec"]


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """A rule to evaluate: its key, version, source, and ordering metadata."""

    key: str
    version: int
    source: str
    priority: int = 100
    group: str | None = None
    # "goal": evaluate the rule's goal (rules/goals.py), under a key of its own
    entry: str = "match"


@dataclass(slots=True)
class Outcome:
    """The result of evaluating a RuleSet on one profile.

    ``matched``: keys of the rules that returned a truthy value, by priority (highest
    first), then key. ``errors``: key -> ``"KeyError: 'x'"`` for rules that raised.
    ``timeouts``: keys of rules stopped by the time budget. Neither of the last two
    is in ``matched``.

    :attr:`horizons` (only from a ``RuleSet(..., horizons=True)``; else ``None``): for
    every rule, the earliest date on which its answer for this profile could differ
    (``None``: never); a rule that raised or timed out gets the day after ``today``.
    :attr:`horizon` is the earliest of them.
    """

    matched: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    timeouts: list[str] = field(default_factory=list)
    _hz: Horizons | None = field(default=None, repr=False, compare=False)

    @property
    def horizons(self) -> Horizons | None:
        """Rule key -> horizon (a read-only mapping: ``dict(...)`` copies it; ``None``
        when the set was not compiled with ``horizons=True``)."""
        return self._hz

    @property
    def horizon(self) -> date | None:
        """The earliest horizon of all rules (``None``: never, or not tracked)."""
        hz = self._hz
        return None if hz is None else hz.earliest()


class Horizons(Mapping[str, "date | None"]):
    """Rule key -> horizon date (``None``: never) of one evaluation: a view over the
    evaluator's offsets (days after today), made into dates on access."""

    __slots__ = ("_dates", "_index", "_offsets")

    def __init__(self, index: dict[str, int], offsets: list[int], dates: _Dates) -> None:
        self._index, self._offsets, self._dates = index, offsets, dates

    def __getitem__(self, key: str) -> date | None:
        return self._dates[self._offsets[self._index[key]]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __repr__(self) -> str:
        return repr(dict(self))

    def earliest(self) -> date | None:
        """The earliest horizon (``None``: never)."""
        return self._dates[min(self._offsets)] if self._offsets else None


def _generate(n: int, budgeted: bool, tracked: tuple[bool | None, ...] | None = None) -> Any:
    """Source of the evaluator of ``n`` rules, unrolled, as a factory of closures.

    Only names we choose appear in the source (rule keys and functions are passed
    as values), so nothing from a rule can end up in this code. ``tracked``: one
    flag per rule (True: compiled for horizons; False: evaluated untracked, horizon
    tomorrow; None: never reads ``ctx``, horizon never); the evaluator then takes the
    recorder ``r`` and fills ``hz``.
    """
    if n == 0:
        return lambda *_: lambda *_: True
    fs = "".join(f"f{i}, " for i in range(n))
    ks = "".join(f"k{i}, " for i in range(n))
    cs = "".join(f"c{i}, " for i in range(n))
    ind = "            " if budgeted else "        "
    body = []
    for i in range(n):
        if budgeted:
            body.append(f"{ind}box[0] = seq + {i}" if i else f"{ind}box[0] = seq")
        if tracked is not None and tracked[i]:
            body.append(f"{ind}r[0] = N")
        body += [
            f"{ind}try:",
            f"{ind}    if f{i}(p, c{i}):",
            f"{ind}        m.append(k{i})",
            f"{ind}except Exception as e:",
            f"{ind}    errs[k{i}] = describe(e)",
        ]
        if tracked is not None and tracked[i]:
            body += [f"{ind}    r[0] = 1", f"{ind}hz[{i}] = r[0]"]
        elif tracked is not None and tracked[i] is not None:
            body.append(f"{ind}hz[{i}] = 1")
        elif tracked is not None:  # never reads ctx: only an error wakes it
            body.append(f"{ind}    hz[{i}] = 1")
    lines = [
        "def factory(fns, keys, describe, BudgetExceeded, clear, N=None):",
        f"    {fs}= fns",
        f"    {ks}= keys",
        "    def run(p, cs, m, errs, box, seq, slot, r=None, hz=None):",
        f"        {cs}= cs",
        "        tid = slot.tid",
    ]
    if budgeted:
        lines += [
            "        try:",
            *body,
            "            box[0] = 0",
            "            if slot.fired_seq >= seq:",
            "                clear(tid, None)",
            "        except BudgetExceeded:",
            "            box[0] = 0",  # these two first: see rules/budget.py, "Races"
            "            clear(tid, None)",
            "            return False",
            "        return True",
        ]
    else:
        lines += [*body, "        return True"]
    lines.append("    return run")
    namespace: dict[str, Any] = {}
    exec(compile("\n".join(lines), "<ruleset>", "exec"), namespace)  # noqa: S102 - our own code
    return namespace["factory"]


class RuleSet:
    """Compiled rules, evaluated together on one profile at a time.

    ``budget_ms`` limits each rule on each profile (``0``/``None``: no limit).
    Raises :class:`~base.errors.RuleCompileError` naming the rule (``.key``)
    when a source does not compile, ``ValueError`` for duplicate keys.
    """

    def __init__(
        self, specs: Iterable[RuleSpec], budget_ms: float | None = 50.0, horizons: bool = False
    ) -> None:
        specs = list(specs)
        keys = [s.key for s in specs]
        if len(set(keys)) != len(keys):
            raise ValueError(
                "duplicate rule keys: " + ", ".join(sorted({k for k in keys if keys.count(k) > 1}))
            )
        self.budget_ms = float(budget_ms or 0.0)
        self.horizons = horizons
        compiled = {}
        untracked: set[str] = set()
        timeless: set[str] = set()
        for s in specs:
            try:
                compiled[s.key] = (compile_rule(s.source, s.key, self.budget_ms)
                                   if s.entry == "match" else
                                   compile_rule(s.source, s.key, self.budget_ms, entry=s.entry))
            except RuleCompileError as exc:
                err = RuleCompileError(f"rule {s.key!r}: {exc.reason}", exc.line)
                err.key = s.key
                raise err from None
            if horizons:
                try:
                    tracked = (compile_rule(s.source, s.key, self.budget_ms, tracked=True)
                               if s.entry == "match" else
                               compile_rule(s.source, s.key, self.budget_ms, tracked=True,
                                            entry=s.entry))
                except (Untrackable, RuleCompileError):
                    untracked.add(s.key)  # evaluated as compiled above: horizon tomorrow
                    continue
                if tracked.raw.__globals__.get(TIMELESS):
                    timeless.add(s.key)  # never reads ctx: the plain function, never wakes
                else:
                    compiled[s.key] = tracked
        self.specs: tuple[RuleSpec, ...] = tuple(sorted(specs, key=lambda s: (-s.priority, s.key)))
        self.keys: tuple[str, ...] = tuple(s.key for s in self.specs)
        self.compiled = tuple(compiled[k] for k in self.keys)
        self._fns = tuple(c.raw for c in self.compiled)
        self._n = len(self._fns)
        self._index = {k: i for i, k in enumerate(self.keys)}
        self._budget_s = self.budget_ms / 1000.0
        self._tracked: tuple[bool | None, ...] | None = None
        if horizons:  # per rule: True tracked, False untracked (tomorrow), None timeless
            self._tracked = tuple(
                None if k in timeless else k not in untracked for k in self.keys
            )
        factory = _generate(self._n, bool(self._budget_s), self._tracked)
        self._run = factory(
            self._fns,
            self.keys,
            _describe_tracked if horizons else describe_error,
            BudgetExceeded,
            clear_async_exc,
            NEVER,
        )
        self._cc: tuple[Any, tuple[Context, ...]] = (None, ())
        self._tcc: dict[int, _TrackedContexts] = {}  # thread id -> its tracked contexts

    def __len__(self) -> int:
        return self._n

    def _contexts(self, ctx: Context) -> tuple[Context, ...]:
        # One tuple attribute, swapped atomically: safe when threads share the set.
        cs = tuple(replace(ctx, rule_key=s.key, rule_version=s.version) for s in self.specs)
        self._cc = (ctx, cs)
        return cs

    def _tracked_contexts(self, ctx: Context, tid: int) -> _TrackedContexts:
        # Per thread: a tracked context's dates hold the thread's horizon recorder.
        r = horizon_recorder()
        base = track_context(ctx, r)
        cs = tuple(replace(base, rule_key=s.key, rule_version=s.version) for s in self.specs)
        tc = (ctx, cs, _Dates(ctx.today), r)
        if len(self._tcc) > 64:
            self._tcc.clear()
        self._tcc[tid] = tc
        return tc

    def evaluate(self, profile: Any, ctx: Context) -> Outcome:
        """Evaluate every rule on ``profile``; never raises because of a rule."""
        if self._tracked is not None:
            return self._evaluate_tracked(profile, ctx)
        cc = self._cc
        cs = cc[1] if cc[0] is ctx else self._contexts(ctx)
        slot = current_slot()
        slot.profile = profile
        slot.owned = None
        seq = slot.seq + 1
        slot.seq = seq + self._n
        m: list[str] = []
        errs: dict[str, str] = {}
        box = slot.box
        if self._budget_s:
            box[1] = self._budget_s
            box[2] = seq  # rule i runs as seq + i: lets the watchdog charge it
            box[0] = seq  # armed before looking at ``idle``: see _Watchdog._run
            if WATCHDOG.idle:
                WATCHDOG.wake()
        try:
            if self._run(profile, cs, m, errs, box, seq, slot):
                timeouts: list[str] = []
            else:
                timeouts = self._resume(profile, cs, m, errs, box, seq, slot)
        except BaseException:
            # KeyboardInterrupt & co. pass through rules: disarm first, or the
            # watchdog would interrupt whatever the caller does next.
            box[0] = 0
            clear_async_exc(slot.tid, None)
            slot.profile = None
            raise
        slot.profile = None
        return Outcome(m, errs, timeouts)

    def _evaluate_tracked(self, profile: Any, ctx: Context) -> Outcome:
        """:meth:`evaluate` of a set compiled with ``horizons=True``."""
        slot = current_slot()
        tc = self._tcc.get(slot.tid)
        if tc is None or tc[0] is not ctx:
            tc = self._tracked_contexts(ctx, slot.tid)
        _, cs, dates, r = tc
        slot.profile = profile
        slot.owned = None
        seq = slot.seq + 1
        slot.seq = seq + self._n
        m: list[str] = []
        errs: dict[str, str] = {}
        box = slot.box
        saved = r[0]
        hz = [NEVER] * self._n
        if self._budget_s:
            box[1] = self._budget_s
            box[2] = seq
            box[0] = seq
            if WATCHDOG.idle:
                WATCHDOG.wake()
        try:
            if self._run(profile, cs, m, errs, box, seq, slot, r, hz):
                timeouts: list[str] = []
            else:
                timeouts = self._resume(profile, cs, m, errs, box, seq, slot, r, hz)
        except BaseException:
            box[0] = 0
            clear_async_exc(slot.tid, None)
            slot.profile = None
            r[0] = saved
            raise
        slot.profile = None
        r[0] = saved
        return Outcome(m, errs, timeouts, Horizons(self._index, hz, dates))

    def _resume(
        self,
        p: Any,
        cs: tuple[Context, ...],
        m: list[str],
        errs: dict[str, str],
        box: list[Any],
        seq: int,
        slot: Slot,
        r: list[int] | None = None,
        hz: list[int] | None = None,
    ) -> list[str]:
        """After an interrupt: mark the rule the watchdog stopped, re-run the ones after it.

        The interrupt may have landed a little after the rule it was meant for
        (budget.py), so results of later rules are dropped and recomputed.
        """
        fns, keys, index, n = self._fns, self.keys, self._index, self._n
        tid = slot.tid
        timeouts: list[str] = []
        while True:
            k = slot.fired_seq - seq
            if not 0 <= k < n:
                k = -1  # cannot tell which rule: start the profile over
            timeouts = [t for t in timeouts if index[t] < k] + ([keys[k]] if k >= 0 else [])
            m[:] = [x for x in m if index[x] < k]
            for x in [x for x in errs if index[x] >= k]:
                del errs[x]
            tracked = self._tracked
            if hz is not None and k >= 0:
                hz[k] = 1  # timed out: tomorrow
            try:
                for i in range(k + 1, n):
                    box[0] = seq + i
                    if r is not None:
                        r[0] = NEVER
                    try:
                        if fns[i](p, cs[i]):
                            m.append(keys[i])
                    except Exception as e:
                        if r is not None:
                            r[0] = 1
                            describe_tracked(e)  # plain values in its arguments
                        errs[keys[i]] = describe_error(e)
                    if r is not None and hz is not None and tracked is not None:
                        if tracked[i] is None:
                            hz[i] = 1 if keys[i] in errs else NEVER
                        else:
                            hz[i] = r[0] if tracked[i] else 1
                box[0] = 0
                if slot.fired_seq >= seq:
                    clear_async_exc(tid, None)
                return timeouts
            except BudgetExceeded:
                box[0] = 0  # these two first: see rules/budget.py, "Races"
                clear_async_exc(tid, None)

    @property
    def budgeted(self) -> bool:
        """Whether rules run under the per-profile budget (and so can be charged)."""
        return bool(self._budget_s)

    def open_batch(self, budget_ms: float) -> Slot:
        """Start a batch on the calling thread: from now on the watchdog charges the
        CPU each rule uses, and interrupts a rule whose charge reaches ``budget_ms``
        (its index is then in ``slot.over``). Needs :attr:`budgeted`.
        Close with :meth:`close_batch`."""
        slot = current_slot()
        slot.open_batch(self._n, budget_ms / 1000.0)
        return slot

    def close_batch(self, slot: Slot) -> dict[str, float]:
        """End the batch: CPU seconds charged to each rule (sampled; see rules/budget.py)."""
        return {self.keys[i]: c for i, c in enumerate(slot.close_batch()) if c}

    def evaluate_many(
        self, profiles: Iterable[tuple[int, Any]], ctx: Context
    ) -> Iterator[tuple[int, Outcome]]:
        """``(user_id, Outcome)`` for each ``(user_id, profile)``."""
        evaluate = self.evaluate
        for uid, profile in profiles:
            yield uid, evaluate(profile, ctx)


_TrackedContexts = tuple[Context, tuple[Context, ...], "_Dates", list[int]]


def _describe_tracked(exc: BaseException) -> str:
    return describe_error(describe_tracked(exc))


class _Dates(dict[int, date | None]):
    """Horizon offsets (days after ``today``) as dates, computed once per offset."""

    def __init__(self, today: date) -> None:
        super().__init__({NEVER: None})
        self.today = today

    def __missing__(self, k: int) -> date | None:
        if len(self) > 100_000:
            self.clear()
            self[NEVER] = None
        d = offset_date(self.today, k)
        self[k] = d
        return d


@dataclass(frozen=True, slots=True)
class ActiveRule:
    key: str
    version: int
    name: str
    group: str | None
    priority: int
    source: str
    banner: dict[str, Any] | None
    email: dict[str, Any] | None
    # Content variants (channels/variants.py) and the salt they, the holdout and a
    # canary are hashed with (None: the key).
    variants: list[dict[str, Any]] | None = None
    salt: str | None = None
    # A canary rollout (catalogue/rollout.py): this version reaches ``rollout`` % of the
    # users (those whose bucket of ``salt`` is in that share), ``base`` (the version
    # live before) the rest. None: this version for everyone.
    rollout: int | None = None
    base: ActiveRule | None = None

    def spec(self) -> RuleSpec:
        return RuleSpec(key=self.key, version=self.version, source=self.source,
                        priority=self.priority, group=self.group)

    def to_list(self) -> list[Any]:
        """The JSON form a sandbox child rebuilds it from (:meth:`from_list`)."""
        return [self.key, self.version, self.name, self.group, self.priority, self.source,
                self.banner, self.email, self.variants, self.salt, self.rollout,
                self.base.to_list() if self.base is not None else None]

    @classmethod
    def from_list(cls, v: list[Any]) -> ActiveRule:
        p = [*v, *[None] * (12 - len(v))]  # older, shorter forms: the rest unset
        return cls(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10],
                   cls.from_list(p[11]) if p[11] is not None else None)
