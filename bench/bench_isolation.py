"""What running rules in sandbox children costs, measured against running them here.

    .venv/bin/python bench/bench_isolation.py [--users 20000] [--repeat 5]

Over the same synthetic profiles and the 50 rules of bench/rules50.py, in one run:

1. the evaluator's batch path: ``evaluate_rows`` over COPY-text rows parsed in this
   process (the engine before isolation) vs the same rows sent to a warm sandbox
   child (``eval`` op, what ``kvadrupel evaluate`` does now): users/s and the ratio;
2. the test panel: one rule on one profile with its banner and e-mail rendered,
   through a warm child (``RuleService.test``'s two requests): median and p99 ms;
3. starting a child: seconds until it answers its first request.

Best of ``--repeat`` for throughput (CPU time of both processes counted); the
machine's load is printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.rules50 import RULES50  # noqa: E402
from engine.evaluate.evaluation import CompiledPack, RangeStats, evaluate_rows  # noqa: E402
from engine.evaluate.worker import PackInfo  # noqa: E402
from kvadrupel.synthetic import users  # noqa: E402
from rules.context import make_context  # noqa: E402
from rules.isolation import SandboxPool  # noqa: E402
from rules.models import RuleIn  # noqa: E402
from rules.remote import CHILD_MODULE, RuleRunner  # noqa: E402
from rules.ruleset import (
    ActiveRule,  # noqa: E402
    RuleSpec,  # noqa: E402
)
from shards.copytext import encode_rows, parse_rows  # noqa: E402

AS_OF = date(2026, 11, 24)
TZ = "Europe/Moscow"
BATCH = 256


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rules = [RuleIn.model_validate(r) for r in RULES50]
    active = [ActiveRule(r.key, 1, r.name, r.group, r.priority, r.source,
                         r.banner.model_dump() if r.banner else None,
                         r.email.model_dump() if r.email else None) for r in rules]
    docs = list(users(args.users, AS_OF))
    lines = encode_rows([(u, d, None) for u, d in docs])
    batches = [lines[i:i + BATCH] for i in range(0, len(lines), BATCH)]
    info = PackInfo.build(active, "bench", None, frozenset(), 50.0, 1000.0)
    pack = CompiledPack(active, 50.0, "bench", batch_budget_ms=1000.0)
    ctx = make_context(AS_OF, TZ)
    pool = SandboxPool(CHILD_MODULE, size=1)

    t0 = time.perf_counter()
    pool.call("ping")
    spawn = time.perf_counter() - t0

    def here() -> None:
        for b in batches:
            evaluate_rows(parse_rows(b), pack, ctx, None, RangeStats())

    def child() -> None:
        meta = {"pack": info.id, "ctx": [AS_OF.isoformat(), TZ], "run_id": None}
        for b in batches:
            pool.call("eval", meta, b"".join(b), cpu_s=60,
                      cache=(info.id, lambda: info.payload))

    def cpu_both() -> float:
        own = os.times()
        return own.user + own.system + own.children_user + own.children_system

    child()  # warm: compile the pack in the child
    best = {"here": float("inf"), "child": float("inf")}
    kid_pid = pool._idle[0].proc.pid  # noqa: SLF001 - bench: the child's CPU
    for _ in range(args.repeat):
        for name, fn in (("here", here), ("child", child)):
            c0 = cpu_both() + _proc_cpu(kid_pid)
            w0 = time.perf_counter()
            fn()
            wall = time.perf_counter() - w0
            cpu = cpu_both() + _proc_cpu(kid_pid) - c0
            best[name] = min(best[name], max(wall, cpu))
    n = len(docs)
    print(f"=== isolation: {n:,} users x {len(active)} rules, batches of {BATCH}; "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"  in this process (COPY rows parsed here): {n / best['here']:,.0f} users/s "
          f"({best['here'] / n * 1e6:.1f} us/user)")
    print(f"  in a sandbox child (rows piped over):    {n / best['child']:,.0f} users/s "
          f"({best['child'] / n * 1e6:.1f} us/user)")
    print(f"  ratio child/here: {best['child'] / best['here']:.3f}x (target <= 1.05x)")

    runner = RuleRunner(pool)
    spec = RuleSpec(rules[0].key, 1, rules[0].source, rules[0].priority)
    parts = {"banner": active[0].banner, "email": active[0].email}
    times = []
    for _, doc in docs[:500]:
        t0 = time.perf_counter()
        runner.match(spec, doc, AS_OF, TZ)
        runner.render(parts, doc, AS_OF, TZ)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    print(f"  test panel (rule + templates, warm child): median {statistics.median(times):.2f} ms, "
          f"p99 {times[int(len(times) * 0.99) - 1]:.2f} ms (target < 300 ms)")
    print(f"  a new child answers its first request after {spawn:.2f} s")
    pool.close()


def _proc_cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


if __name__ == "__main__":
    main()
