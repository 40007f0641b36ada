"""What goal tracking costs the nightly evaluator: the engine's evaluate_rows over
synthetic users with the 50 rules of bench/rules50.py, as they are and with goals on
5 of them (one in ten), in the same process, interleaved slice by slice.

    flock /tmp/kvadrupel-bench.lock .venv/bin/python bench/bench_goals.py [--users 20000]

Two passes per pack: "enter" (empty states: every match is an episode start) and
"steady" (the states the first pass produced: nothing changes, goals are checked
against open windows and emit Convert results where they hold). Printed: CPU
seconds per pass and the ratio with goals / without. A pack without goals runs the
same code as before goals existed except one test per row (``if goals:``).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.rules50 import RULES50  # noqa: E402
from engine.evaluate.evaluation import CompiledPack, RangeStats, evaluate_rows  # noqa: E402
from engine.messages import Convert  # noqa: E402
from kvadrupel.synthetic import users  # noqa: E402
from rules.context import make_context  # noqa: E402
from rules.ruleset import ActiveRule  # noqa: E402

AS_OF = date(2026, 11, 24)
GOAL = ("\nGOAL_WINDOW_DAYS = 30\n\ndef goal(profile, ctx):\n"
        "    since = days_since(get(profile, 'orders.last_at'), ctx)\n"
        "    return since is not None and since <= 60\n")


def pack(with_goals: bool) -> CompiledPack:
    active = []
    for i, r in enumerate(RULES50):
        source = r["source"] + (GOAL if with_goals and i % 10 == 0 else "")
        active.append(ActiveRule(r["key"], 1, r["name"], r.get("group"), r.get("priority", 100),
                                 source, r.get("banner"), r.get("email")))
    return CompiledPack(active, 50.0)


def run(p: CompiledPack, rows: list[Any], ctx: Any) -> tuple[float, list[Any], int]:
    stats = RangeStats()
    out: list[Any] = []
    converts = 0
    t0 = time.thread_time()
    for i in range(0, len(rows), 256):
        results, states = evaluate_rows(rows[i:i + 256], p, ctx, None, stats)
        out += states
        converts += sum(1 for r in results if type(r) is Convert)
    return time.thread_time() - t0, out, converts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--slices", type=int, default=10)
    args = ap.parse_args()
    docs = list(users(args.users, AS_OF))
    ctx = make_context(AS_OF, "Europe/Moscow")
    later = make_context(date(2026, 11, 30), "Europe/Moscow")
    packs = {"without goals": pack(False), "with goals": pack(True)}
    print(f"{args.users:,} users x 50 rules (goals on 5); shared 2-core machine, "
          f"other helpers' load included")
    gc.freeze()
    total = {(name, phase): 0.0 for name in packs for phase in ("enter", "steady")}
    converts = dict.fromkeys(packs, 0)
    step = max(1, len(docs) // args.slices)
    for s in range(0, len(docs), step):
        part = [(u, d, None) for u, d in docs[s:s + step]]
        for name, p in packs.items():
            t, states, _ = run(p, part, ctx)
            total[(name, "enter")] += t
            prev = {uid: st for uid, st, _ in states}
            again = [(u, d, prev.get(u)) for u, d, _ in part]
            t, _, c = run(p, again, later)
            total[(name, "steady")] += t
            converts[name] += c
    for phase in ("enter", "steady"):
        a, b = total[("without goals", phase)], total[("with goals", phase)]
        print(f"{phase:>6}: without goals {a:.3f} s, with goals {b:.3f} s, ratio {b / a:.3f}")
    print(f"Convert results in the steady pass: {converts['with goals']:,} "
          f"(without goals: {converts['without goals']})")


if __name__ == "__main__":
    main()
