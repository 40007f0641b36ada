"""Audience questions an analyst asks before turning a rule on.

* **preview**: how many users match as of a date — exact over everyone, or
  estimated from a random sample with a 95 % Wilson confidence interval;
* **forecast**: for each of the next N days, how many users would *newly* start
  matching (and so get the e-mail) — a user counts on day d when the rule matches
  on d and did not on d-1;
* **shadow**: a candidate version against the active one: how many users would
  gain or lose the match;
* **lookahead**: how many users the rule would match on *any* day of the next
  365 — the blast radius the approval rule uses, so that a rule that matches no
  one today but everyone next week (``ctx.today >= date("…")``) is not taken
  for a small one. :func:`date_dependence` tells, from the source, whether a
  rule's answer can depend on the date at all.

Nothing is stored or sent. The profiles are read once and kept in memory for the
question (a sample by default), and every rule runs inside the sandbox with its
budget, exactly as in a nightly run.
"""

from __future__ import annotations

import ast
import math
import random
import time
from collections.abc import Iterator
from datetime import date, timedelta
from typing import Any

from rules.context import make_context
from rules.remote import RuleRunner
from rules.ruleset import RuleSet, RuleSpec
from shards.store import ProfileRow

__all__ = ["date_dependence", "forecast", "lookahead", "preview", "shadow", "wilson",
           "wilson_cc"]

Z95 = 1.959963984540054
MAX_EXAMPLES = 20


def wilson(hits: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _population(shards: Any, sample: int | str) -> tuple[Iterator[list[ProfileRow]], int, float]:
    """Stream of profile batches, the (estimated) population, the sampled fraction."""
    total = sum(s.estimate_count() for s in shards.stores)
    if sample == "all" or (isinstance(sample, int) and sample >= total):
        fraction = 1.0
    else:
        fraction = max(1e-6, min(1.0, int(sample) / max(total, 1)))

    def rows() -> Iterator[list[ProfileRow]]:
        for store in shards.stores:
            yield from store.stream_sample(fraction)

    return rows(), total, fraction


def _scale(hits: int, n: int, total: int, fraction: float) -> dict[str, Any]:
    if fraction >= 1.0:
        return {"estimate": hits, "low": hits, "high": hits, "exact": True}
    lo, hi = wilson(hits, n)
    return {"estimate": round(hits / n * total) if n else 0, "low": math.floor(lo * total),
            "high": math.ceil(hi * total), "exact": False}


def preview(shards: Any, spec: RuleSpec, as_of: date, sample: int | str = 20_000,
            tz: str = "Europe/Moscow", *, runner: RuleRunner) -> dict[str, Any]:
    t0 = time.perf_counter()
    batches, total, fraction = _population(shards, sample)
    n = hits = errors = 0
    examples: list[int] = []
    error_sample = None
    for rows in batches:
        grid = runner.grid([spec], [r.doc for r in rows], [as_of], tz)
        for i, row in enumerate(rows):
            n += 1
            if grid.masks[i][0]:
                hits += 1
                if len(examples) < MAX_EXAMPLES:
                    examples.append(row.user_id)
            else:
                failure = grid.failure(i)
                if failure:
                    errors += 1
                    error_sample = error_sample or f"user {row.user_id}: {failure}"
    return {
        "as_of": as_of.isoformat(), "population": total, "evaluated": n,
        "matches": hits, "audience": _scale(hits, n, total, fraction),
        "errors": errors, "error_sample": error_sample,
        "examples": examples, "seconds": round(time.perf_counter() - t0, 3),
    }


def forecast(shards: Any, spec: RuleSpec, start: date, days: int, sample: int | str = 20_000,
             tz: str = "Europe/Moscow", *, runner: RuleRunner) -> dict[str, Any]:
    t0 = time.perf_counter()
    dates = [start + timedelta(days=d) for d in range(-1, days)]
    batches, total, fraction = _population(shards, sample)
    new_per_day = [0] * days
    n = 0
    for rows in batches:
        grid = runner.grid([spec], [r.doc for r in rows], dates, tz)
        for masks in grid.masks:
            n += 1
            prev = masks[0]
            for d in range(days):
                cur = masks[d + 1]
                if cur and not prev:
                    new_per_day[d] += 1
                prev = cur
    out_days = []
    for d, hits in enumerate(new_per_day):
        out_days.append({"date": (start + timedelta(days=d)).isoformat(), "sampled": hits}
                        | _scale(hits, n, total, fraction))
    return {"from": start.isoformat(), "days": out_days, "population": total, "evaluated": n,
            "seconds": round(time.perf_counter() - t0, 3)}


def shadow(shards: Any, active: RuleSpec, candidate: RuleSpec, as_of: date,
           sample: int | str = 20_000, tz: str = "Europe/Moscow", *,
           runner: RuleRunner, examples: int = MAX_EXAMPLES) -> dict[str, Any]:
    t0 = time.perf_counter()
    batches, total, fraction = _population(shards, sample)
    n = gain = lose = both = 0
    gained: list[int] = []
    lost: list[int] = []
    for rows in batches:
        docs = [r.doc for r in rows]
        was_grid = runner.grid([active], docs, [as_of], tz)
        now_grid = runner.grid([candidate], docs, [as_of], tz)
        for i, row in enumerate(rows):
            n += 1
            was = bool(was_grid.masks[i][0])
            now = bool(now_grid.masks[i][0])
            if now and not was:
                gain += 1
                if len(gained) < examples:
                    gained.append(row.user_id)
            elif was and not now:
                lose += 1
                if len(lost) < examples:
                    lost.append(row.user_id)
            elif was and now:
                both += 1
    return {
        "as_of": as_of.isoformat(), "population": total, "evaluated": n,
        "gain": _scale(gain, n, total, fraction), "lose": _scale(lose, n, total, fraction),
        "unchanged_matches": _scale(both, n, total, fraction),
        "gained_examples": gained, "lost_examples": lost,
        "seconds": round(time.perf_counter() - t0, 3),
    }


# -- lookahead: the blast radius over the next year ----------------------------------
LOOKAHEAD_DAYS = 365
MAX_LOOKAHEAD_EVALUATIONS = 2_000_000  # ~2 µs each: a few seconds of one core
MAX_LOOKAHEAD_SECONDS = 10.0
MAX_HELD = 50_000  # profiles kept in memory for the day-by-day scan (a uniform reservoir)
SCAN_CHUNK = 1024  # users scanned together, day by day (one context switch per day)
SCAN_BLOCK_MAX = 32  # days per sandbox request in the scan (blocks grow 1, 2, 4… to this)
PROBE_OFFSETS = (-1, 1, 7, 30, 91, 182, 273, 365)
PROBE_USERS = 256
PROBE_MATCHED = 64
Z95_ONE_SIDED = 1.6448536269514722

# ``ctx`` fields that do not move with the evaluation date.
_CTX_STATIC = frozenset({"rule_key", "rule_version", "tz"})
# Helpers that read ``ctx.today`` (rules/helpers.py).
_DATE_HELPERS = frozenset({"days_until", "days_since", "age", "is_birthday"})
# Methods of date/datetime objects that read the real clock (``ctx.now.now()``): the
# sandbox lets them through, and no ``ctx`` the lookahead builds can move them.
_CLOCK_METHODS = frozenset({"now", "utcnow", "today", "fromtimestamp", "utcfromtimestamp"})


def wilson_cc(hits: int, n: int, z: float = Z95_ONE_SIDED) -> tuple[float, float]:
    """Wilson score bounds of a proportion with continuity correction (Newcombe 1998).

    With the default ``z`` each bound is a one-sided 95 % bound; the correction makes
    them conservative for small counts (0 of n gives about 2.7/n, not 0)."""
    if n <= 0:
        return (0.0, 1.0)
    p = hits / n
    z2 = z * z
    denom = 2 * (n + z2)
    if hits <= 0:
        lo = 0.0
    else:
        root = math.sqrt(max(0.0, z2 - 2 - 1 / n + 4 * p * (n * (1 - p) + 1)))
        lo = max(0.0, (2 * n * p + z2 - 1 - z * root) / denom)
    if hits >= n:
        hi = 1.0
    else:
        root = math.sqrt(max(0.0, z2 + 2 - 1 / n + 4 * p * (n * (1 - p) - 1)))
        hi = min(1.0, (2 * n * p + z2 + 1 + z * root) / denom)
    return (lo, hi)


def date_dependence(source: str) -> dict[str, Any]:
    """Whether a rule's answer can depend on the evaluation date, read from its source.

    ``{"reads_date": bool, "system_clock": bool, "reasons": [str, ...]}``. A rule
    learns the date only through ``ctx`` (its second parameter): it *reads the date*
    when it uses ``ctx.today``/``ctx.now``, calls a date helper with ``ctx``
    (``days_until(…, ctx)``), or hands ``ctx`` on whole (to a function of its own,
    ``ctx["today"]``…); ``ctx.rule_key``, ``ctx.rule_version`` and ``ctx.tz`` do not
    count. ``system_clock``: it calls ``.now()``/``.today()``… on a date object, which
    reads the real clock — no simulated date moves that. Conservative: what cannot be
    analysed counts as reading the date.
    """
    reasons: list[str] = []
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return {"reads_date": True, "system_clock": False,
                "reasons": ["the source could not be analysed"]}
    fn = None
    for stmt in tree.body:  # the last definition of ``match`` is the one that runs
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef) and stmt.name == "match":
            fn = stmt
    parents: dict[int, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[id(child)] = node

    def add(reason: str) -> None:
        if reason not in reasons:
            reasons.append(reason)

    ctx_name: str | None = None
    if fn is None:
        add("no plain `def match(profile, ctx)` to analyse")
    else:
        params = [*fn.args.posonlyargs, *fn.args.args]
        if len(params) >= 2:
            ctx_name = params[1].arg
        elif fn.args.vararg is not None:
            add("match takes *args: cannot tell what it does with ctx")
    system_clock = False
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in _CLOCK_METHODS
                and not (isinstance(node.func.value, ast.Name) and node.func.value.id == ctx_name)):
            system_clock = True
            add(f"calls .{node.func.attr}() (line {node.lineno}): the real clock, which no "
                "simulated date moves")
        if ctx_name is None or not (isinstance(node, ast.Name) and node.id == ctx_name
                                    and isinstance(node.ctx, ast.Load)):
            continue
        parent = parents.get(id(node))
        if isinstance(parent, ast.Attribute) and parent.value is node:
            if parent.attr not in _CTX_STATIC:  # today, now, or anything unknown
                add(f"reads ctx.{parent.attr}")
        elif (isinstance(parent, ast.Call) and node in parent.args
              and isinstance(parent.func, ast.Name) and parent.func.id in _DATE_HELPERS):
            add(f"calls {parent.func.id}(…, ctx)")
        else:
            add(f"uses ctx as a whole (line {node.lineno}), which carries today's date")
    return {"reads_date": bool(reasons), "system_clock": system_clock, "reasons": reasons}


class _Evaluator:
    """One rule over documents × dates: through the sandbox's children (``runner``) or,
    without one, a local :class:`RuleSet` under ``budget_ms``.

    ``grid(docs, dates)`` → ``(rows, failed)``: ``rows[i][j]`` whether doc ``i``
    matched at ``dates[j]``; ``failed``: the docs that raised or timed out on some date.
    """

    def __init__(self, spec: RuleSpec, tz: str, budget_ms: float,
                 runner: RuleRunner | None) -> None:
        self.spec, self.tz, self.runner = spec, tz, runner
        self.rs = RuleSet([spec], budget_ms=budget_ms) if runner is None else None
        self.evaluations = 0

    def grid(self, docs: list[Any], dates: list[date]) -> tuple[list[list[bool]], set[int]]:
        self.evaluations += len(docs) * len(dates)
        if not docs or not dates:
            return [[] for _ in docs], set()
        if self.runner is not None:
            g = self.runner.grid([self.spec], docs, dates, self.tz)
            failed = {e[0] for e in g.errors} | {t[0] for t in g.timeouts}
            return [[bool(m & 1) for m in row] for row in g.masks], failed
        assert self.rs is not None
        rows: list[list[bool]] = [[] for _ in docs]
        failed = set()
        for day in dates:  # date-major: one context per date for the whole batch
            ctx = make_context(day, self.tz)
            for i, doc in enumerate(docs):
                out = self.rs.evaluate(doc, ctx)
                rows[i].append(bool(out.matched))
                if out.errors or out.timeouts:
                    failed.add(i)
        return rows, failed


def lookahead(shards: Any, spec: RuleSpec, start: date, days: int = LOOKAHEAD_DAYS,
              sample: int | str = 20_000, tz: str = "Europe/Moscow", budget_ms: float = 50.0,
              *, runner: RuleRunner | None = None,
              max_evaluations: int = MAX_LOOKAHEAD_EVALUATIONS,
              max_seconds: float = MAX_LOOKAHEAD_SECONDS,
              seed: int | None = None) -> dict[str, Any]:
    """How many users the rule matches on *any* day of ``[start, start + days]``.

    Over the same sample as :func:`preview` (``sample``), each user counts once:

    1. every sampled user is evaluated on ``start`` (``today``);
    2. a rule whose source does not read the date (:func:`date_dependence`) is
       still run on a few far-apart dates for a few hundred users; if no answer
       moves, the count is today's;
    3. otherwise the users who do not match today are evaluated day by day (in
       blocks of days that grow from 1 to ``SCAN_BLOCK_MAX``), in a random order,
       and a user leaves the scan at its first match. Work is bounded by
       ``max_evaluations`` (and ``max_seconds``): when it runs out, the users
       scanned so far are a uniform random subset of the rest, and the count is
       given with a one-sided 95 % upper bound (``sampled``: true).

    A rule that reads the real clock (``ctx.now.now()``) cannot be simulated: its
    upper bound is everyone (``unbounded``). ``audience`` is scaled to the
    population like :func:`preview` (``high`` is what an approval rule compares).
    Rule code runs through ``runner`` (the sandbox's children) when given, else in
    a local :class:`RuleSet` with ``budget_ms``.
    """
    t0 = time.perf_counter()
    ev = _Evaluator(spec, tz, budget_ms, runner)
    static = date_dependence(spec.source)
    rng = random.Random(seed)  # noqa: S311 - sampling, not secrets (None: seeded from the OS)
    batches, total, fraction = _population(shards, sample)

    # 1. today, over the whole sample; the rest goes to a uniform reservoir
    n = today_hits = errors = pending = 0
    held: list[ProfileRow] = []
    matched_rows: list[ProfileRow] = []
    for rows in batches:
        got, failed = ev.grid([r.doc for r in rows], [start])
        for i, row in enumerate(rows):
            n += 1
            if got[i][0]:
                today_hits += 1
                if len(matched_rows) < PROBE_MATCHED:
                    matched_rows.append(row)
                continue
            if i in failed:
                errors += 1
            pending += 1
            if len(held) < MAX_HELD:
                held.append(row)
            else:
                j = rng.randrange(pending)
                if j < MAX_HELD:
                    held[j] = row
    per_eval = (time.perf_counter() - t0) / max(n, 1)
    rng.shuffle(held)

    reasons = list(static["reasons"])
    dependent = bool(static["reads_date"])
    probed_changes = 0
    # 2. a rule that does not read the date: check that its answers really stay put
    if not dependent and n and not static["system_clock"]:
        probe = held[:PROBE_USERS] + matched_rows
        base = [False] * len(held[:PROBE_USERS]) + [True] * len(matched_rows)
        dates = [start + timedelta(days=off) for off in PROBE_OFFSETS]
        got, _ = ev.grid([r.doc for r in probe], dates)
        moved = sum(any(m != base[i] for m in got[i]) for i in range(len(probe)))
        probed_changes = moved
        if moved:
            dependent = True
            reasons.append(f"the answer changed with the date for {moved} of "
                           f"{len(probe)} probed users")

    result: dict[str, Any] = {
        "from": start.isoformat(), "to": (start + timedelta(days=days)).isoformat(),
        "days": days, "population": total, "evaluated": n,
        "matches_today": today_hits, "today": _scale(today_hits, n, total, fraction),
        "date_dependent": dependent or bool(static["system_clock"]),
        "system_clock": bool(static["system_clock"]), "reasons": reasons,
        "probed_changes": probed_changes, "pending": pending, "checked": 0, "new_matches": 0,
        "first_new_match": None, "new_examples": [], "sampled": False, "unbounded": False,
        "errors": errors, "max_evaluations": max_evaluations,
    }

    if static["system_clock"]:
        # Nothing we can run tells what the rule does on another day: assume everyone.
        aud_today = result["today"]
        result |= {"unbounded": True, "sampled": True, "matches": n,
                   "audience": {"estimate": total, "low": aud_today["low"], "high": total,
                                "exact": False}}
    elif not dependent:
        result |= {"matches": today_hits, "audience": dict(result["today"])}
    else:
        # 3. day by day, users who do not match today, in chunks, leaving at a match
        checked = new_hits = 0
        first_new: date | None = None
        examples: list[dict[str, Any]] = []
        scan_start, t_scan = ev.evaluations, time.perf_counter()
        i = 0
        while i < len(held) and days > 0:
            elapsed = time.perf_counter() - t0
            if ev.evaluations > scan_start:
                per_eval = (time.perf_counter() - t_scan) / (ev.evaluations - scan_start)
            by_time = (int((max_seconds - elapsed) / (per_eval * days))
                       if per_eval > 0 else SCAN_CHUNK)
            size = min(SCAN_CHUNK, len(held) - i, (max_evaluations - ev.evaluations) // days,
                       by_time)
            if size <= 0:
                break
            remaining = held[i:i + size]
            i += size
            d, block = 1, 1
            while remaining and d <= days:
                dates = [start + timedelta(days=k) for k in range(d, min(days, d + block - 1) + 1)]
                got, _ = ev.grid([r.doc for r in remaining], dates)
                still = []
                for row, marks in zip(remaining, got, strict=True):
                    if any(marks):
                        new_hits += 1
                        day = dates[marks.index(True)]
                        if first_new is None or day < first_new:
                            first_new = day
                        if len(examples) < MAX_EXAMPLES:
                            examples.append({"user_id": row.user_id, "from": day.isoformat()})
                    else:
                        still.append(row)
                remaining = still
                d += len(dates)
                block = min(block * 2, SCAN_BLOCK_MAX)
            checked += size
        result |= {"checked": checked, "new_matches": new_hits,
                   "first_new_match": first_new.isoformat() if first_new else None,
                   "new_examples": examples}
        if checked == pending:  # everyone in the sample: exact over the sample
            hits = today_hits + new_hits
            result |= {"matches": hits, "audience": _scale(hits, n, total, fraction)}
        else:
            q_lo, q_hi = wilson_cc(new_hits, checked)
            est = today_hits + (new_hits / checked * pending if checked else 0.0)
            lo = today_hits + max(new_hits, math.floor(q_lo * pending))
            hi = today_hits + math.ceil(q_hi * pending)
            if fraction >= 1.0:
                aud = {"estimate": round(est), "low": lo, "high": hi, "exact": False}
            else:
                aud = {"estimate": round(est / n * total) if n else 0,
                       "low": _scale(lo, n, total, fraction)["low"],
                       "high": _scale(hi, n, total, fraction)["high"], "exact": False}
            result |= {"sampled": True, "matches": round(est), "matches_high": hi,
                       "audience": aud}
            reasons.append(
                f"evaluation budget reached: {checked:,} of {pending:,} users not matching "
                f"today were checked on every day; the count is a 95 % upper bound"
            )
    result["evaluations"] = ev.evaluations
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result
