"""Turn profiles + rules into state changes (the heart of a nightly run).

For each user the evaluator compares the rules that match now with what matched
before (``user_state``) and emits only *changes*:

* ``enter``: a rule starts matching → a new episode: its banner appears and its
  e-mail goes out once (the ledger keys on user, rule, episode);
* ``exit``: it stops matching → the banner goes; the e-mail re-arms.

A rule that raises or times out on a profile counts as "no match" in the figures
but leaves that user's state for the rule untouched: a buggy rule must not make
banners flicker and e-mails repeat. For the same reason a *quarantined* rule's
state is frozen (no exits) until it is fixed or disabled; a rule an analyst
disabled or deleted exits everywhere at its users' next evaluation.

Rules in the same ``group`` exclude each other: only the highest-priority match
of a group counts. A run restricted to some rules (a campaign) evaluates only
those, emits exits only for those, and still lets a higher-priority rule of the
same group that is active in the user's state (and not evaluated now) win.

The hot path is :func:`evaluate_rows`: one call of the rule set's combined
evaluator per user, then a comparison with the previous state that costs a few
hundred nanoseconds when nothing changed (the common case in a nightly run).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from typing import Any

from base.buckets import bucket, in_share, rollout_salt
from base.errors import ChannelError, RuleError, RuleTimeout
from engine.evaluate.compose import compose
from engine.messages import VERSION, Convert, Enter, Exit, Result
from rules.context import Context
from rules.goals import GOAL_SUFFIX, base_key, goal_key, goal_window, in_window
from rules.ruleset import ActiveRule, Outcome, RuleSet, RuleSpec
from shards.store import ProfileRow

__all__ = ["CompiledPack", "RangeStats", "StateOut", "confirm_slow", "confirm_timeout",
           "evaluate_rows"]

log = logging.getLogger("kvadrupel.evaluate")

# A row to evaluate: (user_id, profile document, previous state or None/{}).
# The state is {rule_key: [episode, active (0/1), version, since (ISO date)]}.
Row = tuple[int, Any, Any]

BASE = "#base"  # the compiled key of a canary's base version: rule key + BASE


class CompiledPack:
    """The rules to evaluate, compiled into one :class:`RuleSet`, with their metadata.

    ``active``: every active rule (for group resolution and metadata); ``only``: the
    keys a restricted run evaluates (None: all of them); ``frozen``: keys whose
    state must be kept although they are not evaluated (quarantined rules).
    """

    def __init__(self, active: list[ActiveRule], budget_ms: float, generation: Any = None, *,
                 only: Iterable[str] | None = None, frozen: Iterable[str] = (),
                 batch_budget_ms: float = 0.0) -> None:
        self.all = {r.key: r for r in active}
        wanted = None if only is None else set(only)
        chosen = [r for r in active if wanted is None or r.key in wanted]
        self.rules = {r.key: r for r in chosen}
        self.keys = frozenset(self.rules)
        specs = [r.spec() for r in chosen]
        # Canary rollouts (catalogue/rollout.py): the version live before is evaluated
        # too, under ``key + BASE``, and each user gets the answer of the version its
        # bucket picks (:meth:`pick`). Both versions' horizons count toward the wake
        # date (the earlier one), so a user is never woken too late for either.
        self.bases: dict[str, ActiveRule] = {}
        self.canaries: list[tuple[str, str, str, int]] = []  # (key, base key, salt, %)
        for r in chosen:
            if r.base is not None and r.rollout is not None and r.rollout < 100:
                bk = r.key + BASE
                specs.append(RuleSpec(key=bk, version=r.base.version, source=r.base.source,
                                      priority=r.priority))
                self.bases[r.key] = r.base
                self.canaries.append((r.key, bk, rollout_salt(r.salt or r.key), r.rollout))
        self._owner = {k + BASE: k for k in self.bases}
        # Compiled for time horizons (rules/horizon.py): every evaluation also says
        # when its answer could next change, the user's place in the wake-up index.
        # Goals (rules/goals.py) run in the same evaluator as companion entries keyed
        # "<rule>#goal": their horizons join the user's wake date like a rule's.
        self.goals: dict[str, int] = {}  # goal key -> attribution window (days)
        for r in chosen:
            window = goal_window(r.source)
            if window is not None:
                self.goals[goal_key(r.key)] = window
                specs.append(RuleSpec(key=goal_key(r.key), version=r.version, source=r.source,
                                      priority=r.priority, entry="goal"))
        self.ruleset = RuleSet(specs, budget_ms=budget_ms, horizons=True)
        # CPU one rule may use on one batch of rows (0: no limit; needs budget_ms).
        self.batch_budget_ms = float(batch_budget_ms or 0.0) if self.ruleset.budgeted else 0.0
        self.generation = generation
        self.restricted = wanted is not None
        self.frozen = frozenset(frozen) - self.keys
        # The rules a restricted run answers for: its active ones, and those of its
        # keys that are no longer active (a sweep after a rule was disabled or
        # deleted: they exit where they were active) unless quarantined (frozen).
        self.speaks_for = self.keys | (frozenset(wanted or ()) - self.frozen)
        # Highest priority first; the first match of a group wins.
        self.order = sorted(active, key=lambda r: (-r.priority, r.key))
        self.rank = {r.key: i for i, r in enumerate(self.order)}
        self.group_of = {r.key: r.group for r in active if r.group}
        self.grouped = any(r.group for r in chosen)

    def owner(self, key: str) -> str:
        """The rule a compiled key belongs to (a canary's base version: its rule)."""
        return self._owner.get(key, key)

    def pick(self, uid: int, outcome: Outcome) -> tuple[Outcome, frozenset[str]]:
        """``outcome`` as this user sees it under the canary rollouts: for each rule in
        a canary, the answer (match, error, timeout) of the version the user's bucket
        picks; and the keys of the rules on which the user stays on the base version."""
        hide: set[str] = set()
        on_base: set[str] = set()
        for key, bk, salt, pct in self.canaries:
            if in_share(bucket(salt, uid), pct):
                hide.add(bk)
            else:
                hide.add(key)
                on_base.add(key)
        if not on_base and not any(bk in outcome.matched or bk in outcome.errors
                                   or bk in outcome.timeouts for _, bk, _, _ in self.canaries):
            return outcome, frozenset()
        own = self._owner.get
        matched = [own(k, k) for k in outcome.matched if k not in hide]
        errors = {own(k, k): v for k, v in outcome.errors.items() if k not in hide}
        timeouts = [own(k, k) for k in outcome.timeouts if k not in hide]
        return Outcome(matched, errors, timeouts, outcome.horizons), frozenset(on_base)

    def resolve_groups(
        self, matched: Iterable[str], prev: dict[str, list[Any]] | None = None
    ) -> list[str]:
        """The matches that survive group exclusion, by priority. In a restricted run,
        ``prev``'s active rules outside the run take part (they win over lower ones)."""
        hit = set(matched)
        if self.restricted and prev:
            hit |= {k for k, v in prev.items() if v[1] and k not in self.keys and k in self.group_of
                    and k in self.all}
        taken: set[str] = set()
        out = []
        for r in self.order:
            if r.key in hit:
                if r.group:
                    if r.group in taken:
                        continue
                    taken.add(r.group)
                out.append(r.key)
        return [k for k in out if k in self.keys] if self.restricted else out


@dataclass(slots=True)
class RangeStats:
    users: int = 0
    matches: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: dict[str, str] = field(default_factory=dict)
    timeouts: dict[str, int] = field(default_factory=dict)  # rule -> a user id it timed out on
    timeout_docs: dict[str, Any] = field(default_factory=dict)  # rule -> that user's profile
    enters: int = 0
    exits: int = 0
    cpu: Counter[str] = field(default_factory=Counter)  # rule -> CPU seconds (sampled)
    slow: dict[str, int] = field(
        default_factory=dict
    )  # rule -> user id it spent its batch budget on

    def to_json(self) -> dict[str, Any]:
        """What a sandbox child sends back (timeout_docs stay behind: the parent
        holds the rows)."""
        return {"users": self.users, "matches": self.matches, "errors": self.errors,
                "error_samples": self.error_samples, "timeouts": self.timeouts,
                "enters": self.enters, "exits": self.exits, "cpu": self.cpu, "slow": self.slow}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RangeStats:
        """Parse a child's figures, checking their types (a child is not trusted)."""
        def counter(v: Any, kind: type) -> Counter[str]:
            if not isinstance(v, dict) or not all(
                    isinstance(k, str) and isinstance(x, kind) and not isinstance(x, bool)
                    for k, x in v.items()):
                raise ValueError("malformed figures from the sandbox")
            return Counter(v)
        return cls(
            users=int(d["users"]), matches=counter(d["matches"], int),
            errors=counter(d["errors"], int),
            error_samples={str(k): str(v)[:2000] for k, v in dict(d["error_samples"]).items()},
            timeouts={str(k): int(v) for k, v in dict(d["timeouts"]).items()},
            enters=int(d["enters"]), exits=int(d["exits"]),
            cpu=Counter({str(k): float(v) for k, v in dict(d["cpu"]).items()}),
            slow={str(k): int(v) for k, v in dict(d["slow"]).items()},
        )

    def merge(self, other: RangeStats) -> None:
        self.users += other.users
        self.matches.update(other.matches)
        self.errors.update(other.errors)
        for k, v in other.error_samples.items():
            self.error_samples.setdefault(k, v)
        self.timeouts.update(other.timeouts)
        self.timeout_docs.update(other.timeout_docs)
        self.enters += other.enters
        self.exits += other.exits
        self.cpu.update(other.cpu)
        self.slow.update(other.slow)


# What evaluate_rows gives per evaluated user: (user_id, new state or None when its
# matches did not change, wake_on as ISO date or None: the earliest date on which an
# answer could change with the profile unchanged). An unchanged user's stored matches
# are left alone (a concurrent re-evaluation after ingest may have just written them):
# only its place in the wake-up index moves.
StateOut = tuple[int, dict[str, list[Any]] | None, str | None]


def evaluate_rows(
    rows: Sequence[Row] | Iterable[Any],
    pack: CompiledPack,
    ctx: Context,
    run_id: int | None,
    stats: RangeStats,
) -> tuple[list[Result], list[StateOut]]:
    """Evaluate a batch of users. Returns (result messages, states to save).

    ``rows``: ``(user_id, doc, state)`` tuples (or rows that unpack like them), or
    :class:`shards.store.ProfileRow`.

    Every evaluated user gets a state to save — changed or not — with the date it
    must be evaluated again at the latest (its place in the wake-up index,
    shards/store.py ``StateWrite``): a nightly run reads only the users due.

    With a batch budget (``pack.batch_budget_ms``) the rules' CPU is charged while
    the batch runs (``stats.cpu``). A rule that spends the budget is interrupted and
    the batch stops after that row (``stats.slow`` names the rule), as it does after
    a row on which a rule timed out (``stats.timeouts``): ``stats.users`` tells how
    many rows were done; the caller decides about the rule and evaluates the rest
    (a rule stuck in a loop would otherwise cost its budget on every row).
    """
    results: list[Result] = []
    states: list[StateOut] = []
    combos: dict[tuple[str, ...], int] = {}
    slot = pack.ruleset.open_batch(pack.batch_budget_ms) if pack.batch_budget_ms else _NO_BATCH
    try:
        _evaluate_rows(rows, pack, ctx, run_id, stats, results, states, combos, slot)
    finally:
        if slot is not _NO_BATCH:
            cpu = pack.ruleset.close_batch(slot)
            if pack.goals:  # a goal's CPU is its rule's
                merged: dict[str, float] = {}
                for k, v in cpu.items():
                    merged[base_key(k)] = merged.get(base_key(k), 0.0) + v
                cpu = merged
            stats.cpu.update(cpu)
    matches = stats.matches
    for combo, count in combos.items():
        for k in combo:
            matches[k] += count
    return results, states


class _NoBatch:
    over = -1


_NO_BATCH: Any = _NoBatch()


def _evaluate_rows(rows: Iterable[Any], pack: CompiledPack, ctx: Context, run_id: int | None,
                   stats: RangeStats, results: list[Result],
                   states: list[StateOut],
                   combos: dict[tuple[str, ...], int], slot: Any) -> None:
    as_of = ctx.today.isoformat()
    wake_of = _wake_of(ctx)
    evaluate = pack.ruleset.evaluate
    restricted = pack.restricted
    speaks_for = pack.speaks_for
    grouped = pack.grouped
    frozen = pack.frozen
    canaries = pack.canaries
    bases = pack.bases
    on_base: frozenset[str] = frozenset()
    goals = pack.goals
    n = 0
    uid = None
    halt = False  # a rule timed out: stop after that row and let the caller police
    for row in rows:
        if halt or slot.over >= 0:
            break
        if type(row) is ProfileRow:
            uid, doc, prev = row.user_id, row.doc, row.state
        else:
            uid, doc, prev = row
        n += 1
        outcome = evaluate(doc, ctx)
        if canaries:
            outcome, on_base = pack.pick(uid, outcome)
        held = _goals(outcome, goals, uid, prev, ctx, as_of, run_id, results) if goals else None
        matched = outcome.matched
        failed: set[str] | None = None
        if outcome.errors or outcome.timeouts:
            failed = _record_failures(outcome, uid, doc, stats)
            halt = bool(outcome.timeouts)
        if grouped and (len(matched) > 1 or (restricted and prev)):
            matched = pack.resolve_groups(matched, prev)
        key = tuple(matched)
        combos[key] = combos.get(key, 0) + 1
        wake = wake_of(outcome, failed)
        if not prev:
            if not matched:
                states.append((uid, None, wake))
                continue  # the common case: nothing before, nothing now
            prev = {}
        else:
            active = [k for k, v in prev.items() if v[1]]
            if active == matched or (len(active) == len(matched) and set(active) == set(matched)):
                states.append((uid, None, wake))
                continue  # nothing changed
        new: dict[str, list[Any]] | None = None
        for k in matched:
            p = prev.get(k)
            if p is not None and p[1]:
                continue
            rule = bases[k] if k in on_base else pack.rules[k]
            episode = (p[0] if p else 0) + 1
            if new is None:
                new = dict(prev)
            new[k] = [episode, 1, rule.version, as_of]
            results.append(_enter(uid, doc, rule, episode, ctx, run_id, stats))
            if held and goal_key(k) in held:
                # the goal holds as the episode starts: it converts at once (so a full
                # night and an incremental one, which may not see this user again, agree)
                results.append(Convert(v=VERSION, user_id=uid, rule=k, episode=episode,
                                       version=rule.version, started=as_of, as_of=as_of,
                                       run_id=run_id))
        for k, p in prev.items():
            if not p[1] or k in matched or (failed and k in failed) or k in frozen:
                continue
            if restricted and k not in speaks_for:
                continue  # a campaign speaks only for its own rules
            if new is None:
                new = dict(prev)
            new[k] = [p[0], 0, p[2], p[3]]
            stats.exits += 1
            ended = pack.all.get(k)
            results.append(Exit(v=VERSION, user_id=uid, rule=k, episode=p[0], version=p[2],
                                priority=ended.priority if ended else 0, as_of=as_of,
                                run_id=run_id))
        if new is not None and restricted:
            # a restricted run writes only its rules' entries: the store merges them
            # into what is stored (another evaluation may have changed other rules')
            new = {k: v for k, v in new.items() if k in speaks_for}
        states.append((uid, new, wake))
    if slot.over >= 0:  # a rule spent the batch budget on the last row done
        assert uid is not None  # so there was a row
        stats.slow[pack.owner(base_key(pack.ruleset.keys[slot.over]))] = uid
    stats.users += n


def _goals(outcome: Outcome, goals: dict[str, int], uid: int, prev: Any, ctx: Context,
           as_of: str, run_id: int | None, results: list[Result]) -> list[str]:
    """Take the goal entries out of ``outcome`` (they are not matches; a goal that
    failed counts as its rule failing), emit a :class:`Convert` for each goal that
    holds within the window of the user's episode of its rule as stored before this
    evaluation, and return the goal keys that hold (an episode starting now converts
    too: the caller emits those after the enter)."""
    hits = [k for k in outcome.matched if k.endswith(GOAL_SUFFIX)]
    if hits:
        outcome.matched = [k for k in outcome.matched if not k.endswith(GOAL_SUFFIX)]
    if outcome.errors:
        for k in [k for k in outcome.errors if k.endswith(GOAL_SUFFIX)]:
            msg = outcome.errors.pop(k)
            outcome.errors.setdefault(base_key(k), f"goal: {msg}")
    if outcome.timeouts:
        outcome.timeouts = list(dict.fromkeys(base_key(k) for k in outcome.timeouts))
    if not hits or not prev:
        return hits
    for g in hits:
        k = base_key(g)
        p = prev.get(k)
        if p is None or not isinstance(p[3], str):
            continue
        try:
            started = date.fromisoformat(p[3])
        except ValueError:
            continue
        if in_window(started, ctx.today, goals[g]):
            results.append(Convert(v=VERSION, user_id=uid, rule=k, episode=p[0], version=p[2],
                                   started=p[3], as_of=as_of, run_id=run_id))
    return hits


def _wake_of(ctx: Context) -> Any:
    """``wake(outcome, failed) -> ISO date or None`` for one evaluation date: the
    earliest of the rules' time horizons (rules/horizon.py; a rule that failed has
    tomorrow), None when no answer depends on the date. Untracked outcomes (a rule
    set compiled without horizons) wake tomorrow."""
    tomorrow = (ctx.today + timedelta(days=1)).isoformat()
    iso: dict[date, str] = {}

    def wake(outcome: Outcome, failed: set[str] | None) -> str | None:
        if outcome.horizons is None:
            return tomorrow
        h = outcome.horizon
        if h is None:
            return None
        text = iso.get(h)
        if text is None:
            text = iso[h] = h.isoformat()
        return text

    return wake


def _record_failures(outcome: Any, uid: int, doc: Any, stats: RangeStats) -> set[str]:
    for k, msg in outcome.errors.items():
        stats.errors[k] += 1
        stats.error_samples.setdefault(k, f"user {uid}: {msg}")
    for k in outcome.timeouts:
        stats.errors[k] += 1
        if k not in stats.timeouts:
            stats.timeouts[k] = uid
            stats.timeout_docs[k] = doc
    return set(outcome.errors) | set(outcome.timeouts)


class _WithGoal:
    """A rule and its goal run one after the other, each under its own budget: what
    confirms a timeout or a batch overrun of either (their figures are the rule's)."""

    def __init__(self, rule: Any, goal: Any) -> None:
        self.rule, self.goal = rule, goal

    def match(self, doc: Any, ctx: Context) -> Any:
        failed: RuleError | None = None
        for compiled in (self.rule, self.goal):
            try:
                compiled.match(doc, ctx)
            except RuleTimeout:
                raise
            except RuleError as exc:
                failed = exc
        if failed is not None:
            raise failed
        return None


def alone(pack: CompiledPack, key: str, ctx: Context) -> tuple[Any, Context]:
    """The compiled rule ``key`` of ``pack`` (with its goal, where it has one) and its
    context, to run it by itself."""
    keys = pack.ruleset.keys
    compiled: Any = pack.ruleset.compiled[keys.index(key)]
    if goal_key(key) in pack.goals:
        compiled = _WithGoal(compiled, pack.ruleset.compiled[keys.index(goal_key(key))])
    return compiled, replace(ctx, rule_key=key, rule_version=pack.rules[key].version)


def confirm_timeout(pack: CompiledPack, key: str, doc: Any, ctx: Context,
                    confirmations: int = 1) -> bool:
    """Confirm a timeout before quarantining: the budget is the thread's CPU time,
    which includes a garbage collection the rule happened to trigger. The rule
    runs again, alone, on the same profile, with the collector off; only a rule
    that overruns every time is taken out."""
    compiled, rule_ctx = alone(pack, key, ctx)
    with collector_off():
        for _ in range(confirmations):
            try:
                compiled.match(doc, rule_ctx)
            except RuleTimeout:
                continue
            except RuleError:
                pass  # it raised instead: an error, counted already
            log.warning("rule %s overran its budget once but not when re-run: not quarantined",
                        key)
            return False
    return True


def confirm_slow(pack: CompiledPack, key: str, docs: Iterable[Any], ctx: Context,
                 batch_budget_ms: float) -> bool:
    """Confirm a batch-budget overrun: the charge is sampled (rules/budget.py) and
    a long garbage collection may land on any rule. Runs the rule alone over the
    same rows, timing its CPU: confirmed once it has used half the budget (the
    charge is right give or take a tick or two; a collection charged to a
    healthy rule is off by orders of magnitude). Costs at most half a budget."""
    compiled, rule_ctx = alone(pack, key, ctx)
    budget_s = batch_budget_ms / 1000.0 / 2
    spent = 0.0
    with collector_off():
        for doc in docs:
            t0 = time.thread_time()
            try:
                compiled.match(doc, rule_ctx)
            except RuleError:
                pass
            spent += time.thread_time() - t0
            if spent >= budget_s:
                return True
    log.warning("rule %s was charged its batch budget but used %.0f ms when re-run alone: "
                "not quarantined", key, spent * 1000)
    return False


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _enter(uid: int, doc: Any, rule: ActiveRule, episode: int, ctx: Context, run_id: int | None,
           stats: RangeStats) -> Enter:
    stats.enters += 1
    banner = email = None
    extra: dict[str, Any] = {}  # language, time zone, push, why-data (engine/evaluate/compose.py)
    try:
        banner, email, extra = compose(rule, doc, ctx, uid)
    except ChannelError as exc:
        stats.errors[rule.key] += 1
        stats.error_samples.setdefault(rule.key, f"user {uid}: template: {exc}")
    why = extra.get("why")
    if isinstance(why, dict) and why.get("timeout"):
        # The explain re-run is the rule's code too: a rule that stalls only there
        # (it can tell the recording proxy from a dict) counts as failing, and the
        # error-rate policing quarantines it.
        stats.errors[rule.key] += 1
        stats.error_samples.setdefault(
            rule.key, f"user {uid}: ran past its budget when re-run to explain the match")
    to = doc.get("email") if isinstance(doc, dict) else None
    return Enter(
        v=VERSION, user_id=uid, rule=rule.key, episode=episode, version=rule.version,
        priority=rule.priority, as_of=ctx.today.isoformat(), run_id=run_id, banner=banner,
        email=(email | {"to": to}) if email and isinstance(to, str) and "@" in to else None,
        **extra)
