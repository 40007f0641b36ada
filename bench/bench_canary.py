"""What a canary rollout costs the evaluator, in one process, same run.

The 50 rules of bench/rules50.py over synthetic users (kvadrupel.synthetic), through
``evaluate_rows`` (the evaluator's hot path, horizons tracked), three ways:

* ``none``: no canary (the comparator);
* ``canary``: one rule in a 50 % canary of a new version (both versions compiled,
  each user given its bucket's answer);
* ``all``: every rule in a 50 % canary (the worst case: twice the rules).

Prints µs per user for each and the ratios to ``none``, best of ``--repeat`` passes.

    .venv/bin/python bench/bench_canary.py [--users 20000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.rules50 import RULES50  # noqa: E402
from engine.evaluate.evaluation import CompiledPack, RangeStats, evaluate_rows  # noqa: E402
from kvadrupel.synthetic import users  # noqa: E402
from rules.context import make_context  # noqa: E402
from rules.ruleset import ActiveRule  # noqa: E402

AS_OF = date(2026, 11, 23)


def active(r: dict, canary: bool) -> ActiveRule:
    base = ActiveRule(r["key"], 1, r["name"], r["group"], r["priority"], r["source"],
                      r["banner"], r["email"])
    if not canary:
        return base
    # the "new version": the same rule with a different source text (compiled apart)
    return ActiveRule(r["key"], 2, r["name"], r["group"], r["priority"],
                      r["source"] + "\n# v2\n", r["banner"], r["email"], rollout=50,
                      salt=r["key"], base=base)


def timed(pack: CompiledPack, rows: list) -> float:
    ctx = make_context(AS_OF)
    gc.collect()
    t0 = time.perf_counter()
    for i in range(0, len(rows), 256):
        evaluate_rows(rows[i:i + 256], pack, ctx, None, RangeStats())
    return (time.perf_counter() - t0) / len(rows) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rows = [(uid, doc, None) for uid, doc in users(args.users, AS_OF)]
    packs = {
        "none": CompiledPack([active(r, False) for r in RULES50], 0),
        "canary": CompiledPack([active(r, i == 0) for i, r in enumerate(RULES50)], 0),
        "all": CompiledPack([active(r, True) for r in RULES50], 0),
    }
    for pack in packs.values():  # warm up: compile caches, first-call costs
        timed(pack, rows[:500])
    figures = dict.fromkeys(packs, float("inf"))
    for _ in range(args.repeat):  # interleaved, so a busy moment hits every variant
        for name, pack in packs.items():
            figures[name] = min(figures[name], timed(pack, rows))
    print(f"{args.users} users, 50 rules, best of {args.repeat} (shared machine)")
    for name, us in figures.items():
        print(f"  {name:<7} {us:8.1f} µs/user   x{us / figures['none']:.2f}")


if __name__ == "__main__":
    main()
