"""Audience questions an analyst asks before turning a rule on.

* **preview**: how many users match as of a date — exact over everyone, or
  estimated from a random sample with a 95 % Wilson confidence interval;
* **forecast**: for each of the next N days, how many users would *newly* start
  matching (and so get the e-mail) — a user counts on day d when the rule matches
  on d and did not on d-1;
* **shadow**: a candidate version against the active one: how many users would
  gain or lose the match.

Nothing is stored or sent. The profiles are read once and kept in memory for the
question (a sample by default), and every rule runs inside the sandbox with its
budget, exactly as in a nightly run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from datetime import date, timedelta
from typing import Any

from rules.context import make_context
from rules.ruleset import RuleSet, RuleSpec
from shards.store import ProfileRow

__all__ = ["forecast", "preview", "shadow", "wilson"]

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
            tz: str = "Europe/Moscow", budget_ms: float = 50.0) -> dict[str, Any]:
    t0 = time.perf_counter()
    rs = RuleSet([spec], budget_ms=budget_ms)
    ctx = make_context(as_of, tz)
    batches, total, fraction = _population(shards, sample)
    n = hits = errors = 0
    examples: list[int] = []
    error_sample = None
    for rows in batches:
        for row in rows:
            n += 1
            out = rs.evaluate(row.doc, ctx)
            if out.matched:
                hits += 1
                if len(examples) < MAX_EXAMPLES:
                    examples.append(row.user_id)
            elif out.errors or out.timeouts:
                errors += 1
                error_sample = error_sample or f"user {row.user_id}: " + (
                    next(iter(out.errors.values()), "timeout"))
    return {
        "as_of": as_of.isoformat(), "population": total, "evaluated": n,
        "matches": hits, "audience": _scale(hits, n, total, fraction),
        "errors": errors, "error_sample": error_sample,
        "examples": examples, "seconds": round(time.perf_counter() - t0, 3),
    }


def forecast(shards: Any, spec: RuleSpec, start: date, days: int, sample: int | str = 20_000,
             tz: str = "Europe/Moscow", budget_ms: float = 50.0) -> dict[str, Any]:
    t0 = time.perf_counter()
    rs = RuleSet([spec], budget_ms=budget_ms)
    ctxs = [make_context(start + timedelta(days=d), tz) for d in range(-1, days)]
    batches, total, fraction = _population(shards, sample)
    new_per_day = [0] * days
    n = 0
    key = spec.key
    for rows in batches:
        for row in rows:
            n += 1
            prev = key in rs.evaluate(row.doc, ctxs[0]).matched
            for d in range(days):
                cur = key in rs.evaluate(row.doc, ctxs[d + 1]).matched
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
           sample: int | str = 20_000, tz: str = "Europe/Moscow",
           budget_ms: float = 50.0) -> dict[str, Any]:
    t0 = time.perf_counter()
    a = RuleSet([active], budget_ms=budget_ms)
    c = RuleSet([candidate], budget_ms=budget_ms)
    ctx = make_context(as_of, tz)
    batches, total, fraction = _population(shards, sample)
    n = gain = lose = both = 0
    gained: list[int] = []
    lost: list[int] = []
    for rows in batches:
        for row in rows:
            n += 1
            was = bool(a.evaluate(row.doc, ctx).matched)
            now = bool(c.evaluate(row.doc, ctx).matched)
            if now and not was:
                gain += 1
                if len(gained) < MAX_EXAMPLES:
                    gained.append(row.user_id)
            elif was and not now:
                lose += 1
                if len(lost) < MAX_EXAMPLES:
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
