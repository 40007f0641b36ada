"""Cost of time horizons: tracked vs untracked evaluation per user (rules/horizon.py).

The 50 rules of bench/rules50.py over synthetic users (kvadrupel.synthetic), in
one process, no isolation: ``RuleSet(specs)`` against
``RuleSet(specs, horizons=True)``, both with the production budget (50 ms). The two
variants run interleaved, batch by batch, and each reports its best round, so load
from other processes on a shared machine hits both alike. Also prints how soon the
users' horizons fall (the share of users due again within 1, 7, 30, 365 days) and
the rules that keep the most users due tomorrow, and checks that both variants give
the same answers. (2024-05-10 is a Friday: weekend-offer wakes everyone on Saturday.)

    python bench/bench_horizons.py [--users 20000] [--rounds 7] [--as-of 2024-05-10] \
        [--nights 30]

``--nights N`` then simulates N nights after the as-of date, in process, with the
profiles unchanged (ingest re-evaluates changed users at once; this is what time
alone wakes): each night evaluates only the users whose earliest horizon has come,
and prints the share due per night and, per rule, on how many nights it woke users
and how many on average: the rules that keep users due night after night, the ones
to rewrite so they sleep.

Goal (issue 16): tracked <= 1.3x untracked per evaluated user.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.rules50 import RULES50  # noqa: E402
from kvadrupel.synthetic import users  # noqa: E402
from rules.context import make_context  # noqa: E402
from rules.ruleset import RuleSet, RuleSpec  # noqa: E402


def _specs() -> list[RuleSpec]:
    return [RuleSpec(r["key"], 1, r["source"], r["priority"], r["group"]) for r in RULES50]


def _round(rs: RuleSet, profiles: list[dict[str, Any]], ctx: Any) -> float:
    ev = rs.evaluate
    t = time.perf_counter()
    for p in profiles:
        ev(p, ctx)
    return time.perf_counter() - t


def _nights(tracked: RuleSet, profiles: list[dict[str, Any]], as_of: date, nights: int) -> None:
    """Nights after ``as_of`` with the profiles unchanged: who is due, and which rules
    woke them (a rule wakes a user when its horizon has come)."""
    n = len(profiles)
    hz: list[dict[str, date | None]] = []
    wake: list[date | None] = []
    for p in profiles:
        out = tracked.evaluate(p, make_context(as_of))
        assert out.horizons is not None
        hz.append(dict(out.horizons))
        wake.append(out.horizon)
    shares: list[float] = []
    woke: dict[str, list[int]] = {}
    for k in range(1, nights + 1):
        d = as_of + timedelta(days=k)
        ctx = make_context(d)
        due = 0
        by_rule: dict[str, int] = {}
        for i, p in enumerate(profiles):
            w = wake[i]
            if w is None or w > d:
                continue
            due += 1
            for key, h in hz[i].items():
                if h is not None and h <= d:
                    by_rule[key] = by_rule.get(key, 0) + 1
            out = tracked.evaluate(p, ctx)
            assert out.horizons is not None
            hz[i] = dict(out.horizons)
            wake[i] = out.horizon
        shares.append(due / n)
        for key, c in by_rule.items():
            woke.setdefault(key, []).append(c)
        top = max(by_rule.items(), key=lambda kv: kv[1], default=("-", 0))
        print(f"night {d} ({d:%a}): {due / n:6.2%} due; most woken by {top[0]} ({top[1] / n:.2%})")
    shares.sort()
    print(
        f"{nights} nights: due per night median {shares[len(shares) // 2]:.2%}, "
        f"max {shares[-1]:.2%}, mean {sum(shares) / nights:.2%}"
    )
    rows = sorted(woke.items(), key=lambda kv: (-len(kv[1]), -sum(kv[1])))
    print("rules that woke users: on how many nights, users woken per night on average:")
    for key, counts in rows[:12]:
        print(f"  {key:28s} {len(counts):3d} nights  {sum(counts) / nights / n:6.2%}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--as-of", default="2024-05-10")
    ap.add_argument("--nights", type=int, default=0, help="then simulate N nights")
    args = ap.parse_args(argv)

    as_of = date.fromisoformat(args.as_of)
    profiles = [p for _, p in users(args.users, as_of)]
    ctx = make_context(as_of)
    plain = RuleSet(_specs(), budget_ms=50)
    tracked = RuleSet(_specs(), budget_ms=50, horizons=True)

    # Same answers, and where the horizons fall.
    within = {1: 0, 7: 0, 30: 0, 365: 0}
    never = 0
    tomorrow = as_of.fromordinal(as_of.toordinal() + 1)
    due: dict[str, int] = {}
    for p in profiles:
        a, b = plain.evaluate(p, ctx), tracked.evaluate(p, ctx)
        if (a.matched, a.errors, a.timeouts) != (b.matched, b.errors, b.timeouts):
            print("MISMATCH", a, b, file=sys.stderr)
            return 1
        assert b.horizons is not None
        for key, rh in b.horizons.items():
            if rh == tomorrow:
                due[key] = due.get(key, 0) + 1
        h = b.horizon
        if h is None:
            never += 1
            continue
        for days in within:
            if (h - as_of).days <= days:
                within[days] += 1

    best = {"untracked": float("inf"), "tracked": float("inf")}
    gc.collect()
    for _ in range(args.rounds):
        best["untracked"] = min(best["untracked"], _round(plain, profiles, ctx))
        best["tracked"] = min(best["tracked"], _round(tracked, profiles, ctx))
    n = len(profiles)
    u, t = best["untracked"] / n * 1e6, best["tracked"] / n * 1e6
    print(
        f"{n:,} users x {len(plain)} rules, as of {as_of}, best of {args.rounds} interleaved rounds"
    )
    print(f"untracked: {u:6.2f} us/user")
    print(f"tracked:   {t:6.2f} us/user")
    print(f"ratio:     {t / u:6.2f}x   (goal <= 1.3x)")
    shares = ", ".join(f"<= {d} d: {c / n:.1%}" for d, c in within.items())
    print(f"users due again within {shares}; never: {never / n:.1%}")
    top = sorted(due.items(), key=lambda kv: -kv[1])[:5]
    print("rules keeping most users due tomorrow: " + ", ".join(f"{k} {c / n:.1%}" for k, c in top))
    if args.nights:
        _nights(tracked, profiles, as_of, args.nights)
    return 0


if __name__ == "__main__":
    sys.exit(main())
