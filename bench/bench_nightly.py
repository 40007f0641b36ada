"""The nightly run, end to end: N synthetic users × 50 rules on 4 PostgreSQL shards,
through the Kafka-protocol broker, to banners and the e-mail ledger.

    flock /tmp/kvadrupel-bench.lock .venv/bin/python bench/bench_nightly.py \\
        [--users 1000000] [--shards 4] [--workers 1,2] [--range-users 25000] [--profile]

What it does (databases ``kvbench_*`` are created here and dropped at the end):

1. loads the users (kvadrupel.synthetic, as of D) into the shards with COPY and
   installs the 50 rules of bench/rules50.py;
2. night D ("cold"): every match is new. Evaluator processes (``kvadrupel
   evaluate``) run it with results going to a topic nobody reads: it fills
   ``user_state`` the way a first night does, and times the evaluators alone;
3. nights D+1, D+2 ... (one per ``--workers`` entry): the measured steady-state
   nightly run, end to end — planning, range jobs over Kafka, evaluator
   processes, results over Kafka, a delivery worker writing banners and claiming
   e-mails in the ledger (outbox mailer) — timed from ``start_run`` until the run
   is done and the delivery worker has handled every result;
4. the ceilings, over the same profiles: (b) I/O, one process reading every
   profile by COPY (raw, and parsed with orjson); (a) compute, the 50 rules as
   plain Python functions called one by one over the profiles in memory, next
   to the sandboxed RuleSet and the engine's evaluate_rows on the same profiles.

Kafka timings as in the tests (session 2 s, fetch wait 20 ms): Tansu's group
join takes half the session timeout. Figures depend on what else runs on the
machine: other processes' load is printed with them.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import date, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson  # noqa: E402
import psycopg  # noqa: E402

from bench.rules50 import RULES50, plain_functions  # noqa: E402
from engine.evaluate.evaluation import CompiledPack, RangeStats, evaluate_rows  # noqa: E402
from kvadrupel.container import Container  # noqa: E402
from kvadrupel.demo import install_pack  # noqa: E402
from kvadrupel.settings import Settings  # noqa: E402
from kvadrupel.synthetic import users  # noqa: E402
from rules.context import make_context  # noqa: E402
from scheduler.planner import start_run  # noqa: E402
from tests.fixtures.kafka import TEST_TIMINGS, start_tansu  # noqa: E402

PG = os.environ.get("KVADRUPEL_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
AS_OF = date(2026, 11, 24)
COLD = "night D (cold, evaluators only)"
ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_avg() -> str:
    return "load avg " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# -- set-up ----------------------------------------------------------------------

def create_databases(n_shards: int) -> tuple[str, list[str]]:
    names = ["kvbench_control"] + [f"kvbench_s{i}" for i in range(n_shards)]
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        for name in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
    sa = PG.replace("postgresql://", "postgresql+psycopg://")
    return f"{sa}/{names[0]}", [f"{sa}/{n}" for n in names[1:]]


def drop_databases(n_shards: int) -> None:
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        for name in ["kvbench_control"] + [f"kvbench_s{i}" for i in range(n_shards)]:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def load_users(container: Container, n: int) -> None:
    shards = container.shards
    router = shards.router
    dsns = [s.engine.url.render_as_string(hide_password=False).replace("+psycopg", "")
            for s in shards.stores]
    with contextlib.ExitStack() as stack:
        conns = [stack.enter_context(psycopg.connect(d)) for d in dsns]
        copies = [stack.enter_context(c.cursor().copy(
            "COPY profiles (user_id, doc, seen, version, updated_at) FROM STDIN")) for c in conns]
        for uid, doc in users(n, AS_OF):
            copies[router.shard_of(uid)].write_row(
                (uid, orjson.dumps(doc).decode(), "[]", 1, "2026-11-24T00:00:00Z"))
    for d in dsns:
        with psycopg.connect(d, autocommit=True) as c:
            c.execute("ANALYZE profiles")


def settings_env(s: Settings) -> dict[str, str]:
    return {
        "KVADRUPEL_SHARDS": ",".join(s.shards), "KVADRUPEL_CONTROL_DB": s.control_db,
        "KVADRUPEL_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
        "KVADRUPEL_KAFKA_TOPIC_PREFIX": s.kafka_topic_prefix,
        "KVADRUPEL_KAFKA_PARTITIONS": str(s.kafka_partitions),
        "KVADRUPEL_KAFKA_SESSION_TIMEOUT_MS": str(s.kafka_session_timeout_ms),
        "KVADRUPEL_KAFKA_HEARTBEAT_INTERVAL_MS": str(s.kafka_heartbeat_interval_ms),
        "KVADRUPEL_KAFKA_FETCH_WAIT_MAX_MS": str(s.kafka_fetch_wait_max_ms),
        "KVADRUPEL_DATA_DIR": str(s.data_dir), "KVADRUPEL_LOG_LEVEL": "WARNING",
        "KVADRUPEL_RANGE_TARGET_USERS": str(s.range_target_users),
    }


def start_workers(s: Settings, n: int, inprocess: bool = False) -> list[subprocess.Popen[bytes]]:
    """``kvadrupel evaluate`` processes (rules in sandbox children), or with
    ``inprocess`` the bench-only evaluator that runs them in itself (the A/B)."""
    env = {**os.environ, **settings_env(s)}
    cmd = ([sys.executable, str(ROOT / "bench" / "inprocess_evaluator.py")] if inprocess
           else [sys.executable, "-m", "kvadrupel.cli", "evaluate"])
    return [subprocess.Popen(cmd, env=env, cwd=ROOT) for _ in range(n)]


def wait_group(bootstrap: str, group: str, timeout: float = 60.0) -> None:
    """Until the group is stable, and still stable a session timeout later (Tansu
    does not list members, so a late joiner shows only as a new rebalance)."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})

    def stable() -> bool:
        try:
            desc = admin.describe_consumer_groups([group])[group].result(timeout=5)
        except Exception:  # noqa: BLE001 - not there yet
            return False
        return str(desc.state).endswith("STABLE")

    deadline = time.monotonic() + timeout
    streak = 0.0
    while time.monotonic() < deadline:
        if stable():
            streak += 0.25
            if streak >= TEST_TIMINGS["session_timeout_ms"] / 1000 + 1:
                return
        else:
            streak = 0.0
        time.sleep(0.25)
    raise RuntimeError(f"group {group} did not settle")


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> list[float]:
    """Stop the worker processes; return the CPU seconds each used (user + system)."""
    for p in procs:
        p.terminate()
    cpu = []
    for p in procs:
        deadline = time.monotonic() + 20
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                p.returncode = status
                cpu.append(usage.ru_utime + usage.ru_stime)
                break
            if time.monotonic() > deadline:
                p.kill()
                deadline = time.monotonic() + 20
            time.sleep(0.05)
    return cpu


# -- one night -----------------------------------------------------------------

def night(base: Settings, as_of: date, workers: int, deliver: bool, label: str,
          inprocess: bool = False, incremental: bool = False) -> dict[str, Any]:
    s = base.model_copy(update={"kafka_topic_prefix": f"b{uuid.uuid4().hex[:8]}"})
    container = Container(s)
    bus = container.bus  # creates the topics
    procs = start_workers(s, workers, inprocess)
    stop = threading.Event()
    delivery = container.delivery_worker() if deliver else None
    threads = [delivery.start_thread(stop)] if delivery else []
    try:
        wait_group(s.kafka_bootstrap, container.group("evaluate"))
        if delivery:
            wait_group(s.kafka_bootstrap, container.group("deliver"))
        log(f"{label}: {workers} evaluator process(es) ready; {load_avg()}")
        t0 = time.perf_counter()
        run_id = start_run(container.shards, container.runs, bus, as_of, s.range_target_users,
                           active=container.rules.active_versions() if incremental else None,
                           verify_every_days=10**6)
        info = container.runs.wait(run_id, timeout=3600, poll_s=0.05)
        t_run = time.perf_counter() - t0
        expected = info["enters"] + info["exits"]
        if delivery:
            while delivery.handled < expected:
                time.sleep(0.02)
        t_all = time.perf_counter() - t0
        info = container.runs.get(run_id)
        out = {"label": label, "workers": workers, "run": info, "t_run": t_run, "t_e2e": t_all,
               "results": expected, "ledger": container.ledger.counts(), "load": load_avg()}
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        cpu = stop_workers(procs)
        container.close()
    out["cpu"] = cpu  # includes each process's start-up (~1 s of imports)
    return out


def incremental_nights(base: Settings, first: date, n: int, workers: int,
                       users_n: int) -> list[dict[str, Any]]:
    """``n`` consecutive incremental nights (the users due in the wake-up index) by
    the same evaluator processes and delivery worker, then one verifying night
    (everyone again, counting mismatches). Each night timed from start_run until
    the run is done and every result delivered."""
    s = base.model_copy(update={"kafka_topic_prefix": f"b{uuid.uuid4().hex[:8]}"})
    container = Container(s)
    bus = container.bus
    procs = start_workers(s, workers)
    stop = threading.Event()
    delivery = container.delivery_worker()
    threads = [delivery.start_thread(stop)]
    out = []
    try:
        wait_group(s.kafka_bootstrap, container.group("evaluate"))
        wait_group(s.kafka_bootstrap, container.group("deliver"))
        active = container.rules.active_versions()
        for i in range(n + 1):
            as_of = first + timedelta(days=i)
            verify = i == n
            t0 = time.perf_counter()
            before = delivery.handled
            run_id = start_run(container.shards, container.runs, bus, as_of,
                               s.range_target_users, active=active, full=verify,
                               verify_every_days=10**6)
            info = container.runs.wait(run_id, timeout=3600, poll_s=0.02)
            t_run = time.perf_counter() - t0
            expected = info["enters"] + info["exits"]
            waited = time.monotonic() + 300
            while delivery.handled - before < expected:
                if time.monotonic() > waited:  # report what is known instead of hanging
                    log(f"delivery stalled: {delivery.handled - before:,} of {expected:,} "
                        f"results handled after 300 s")
                    break
                time.sleep(0.01)
            t_all = time.perf_counter() - t0
            info = container.runs.get(run_id)
            label = f"D+{(as_of - AS_OF).days} {'verify' if verify else info['mode']}"
            out.append({"label": label, "run": info, "t_run": t_run, "t_e2e": t_all,
                        "results": expected})
            log(f"{label}: {info['users']:,} due ({info['users'] / users_n:.2%}), "
                f"{info['swept']:,} swept, {info['enters']:,} enters, {info['exits']:,} exits, "
                f"{info['mismatches']} mismatches; run {t_run:.2f}s, end to end {t_all:.2f}s")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        cpu = stop_workers(procs)
        container.close()
    for night_ in out:
        night_["cpu_total"] = sum(cpu)
    return out


def keep_due(container: Container, as_of: date, sample: int = 20_000,
             within: int = 1) -> list[tuple[str, float]]:
    """Per rule, the share of (a sample of) users whose answer it keeps due within
    ``within`` days: the rules that do not sleep, by how many users they keep awake."""
    from rules.ruleset import RuleSet

    rows = []
    for store in container.shards.stores:
        for chunk in store.stream_sample(min(1.0, sample / max(1, store.count()))):
            rows += chunk
    rs = RuleSet([r.spec() for r in container.rules.active()], budget_ms=0, horizons=True)
    ctx = make_context(as_of, container.settings.timezone)
    tomorrow = as_of + timedelta(days=within)
    awake: dict[str, int] = {}
    for row in rows:
        outcome = rs.evaluate(row.doc, ctx)
        for key, h in outcome.horizons.items():
            if h is not None and h <= tomorrow:
                awake[key] = awake.get(key, 0) + 1
    return sorted(((k, n / max(1, len(rows))) for k, n in awake.items()), key=lambda kv: -kv[1])


# -- ceilings ------------------------------------------------------------------

def read_raw(container: Container) -> tuple[int, float]:
    """Every profile's bytes by COPY, one process, shard after shard (no parsing)."""
    n = 0
    t0 = time.perf_counter()
    for store in container.shards.stores:
        dsn = store.engine.url.render_as_string(hide_password=False).replace("+psycopg", "")
        with psycopg.connect(dsn) as conn, conn.cursor() as cur, \
                cur.copy("COPY (SELECT user_id, doc FROM profiles) TO STDOUT") as cp:
            for _ in cp:
                n += 1
    return n, time.perf_counter() - t0


def read_all(container: Container) -> tuple[int, float, list[Any]]:
    """Every user as the evaluator reads it (profile and state, parsed), one process."""
    from shards.router import MAX_USER_ID

    out: list[Any] = []
    t0 = time.perf_counter()
    for store in container.shards.stores:
        for rows in store.scan_range(1, MAX_USER_ID, 256):
            out += rows
    return len(out), time.perf_counter() - t0, out


def ceilings(container: Container, as_of: date) -> dict[str, Any]:
    n_raw, t_raw = read_raw(container)
    n, t_parse, rows = read_all(container)
    ctx = make_context(as_of, container.settings.timezone)
    fns = plain_functions()

    def plain(part: list[Any]) -> None:
        for _, p, _ in part:
            m = []
            for key, fn in fns:
                try:
                    if fn(p, ctx):
                        m.append(key)
                except Exception:  # noqa: BLE001 - a rule error is "no match"
                    pass

    pack = CompiledPack(container.rules.active(), container.settings.rule_budget_ms,
                        batch_budget_ms=container.settings.rule_batch_budget_ms)

    def sandboxed(part: list[Any]) -> None:
        evaluate = pack.ruleset.evaluate
        for _, p, _ in part:
            evaluate(p, ctx)

    def engine(part: list[Any]) -> None:
        stats = RangeStats()
        for i in range(0, len(part), 256):
            evaluate_rows(part[i:i + 256], pack, ctx, None, stats)

    # CPU time, interleaved slice by slice: the three see the same conditions
    # (other processes' load changes by the minute on a shared machine).
    timings = {"plain": 0.0, "sandboxed": 0.0, "engine": 0.0}
    gc.freeze()
    step = max(256, len(rows) // 40)
    for i in range(0, len(rows), step):
        part = rows[i:i + step]
        for name, fn in (("plain", plain), ("sandboxed", sandboxed), ("engine", engine)):
            t0 = time.process_time()
            fn(part)
            timings[name] += time.process_time() - t0
    gc.unfreeze()
    for name, t in timings.items():
        log(f"ceiling {name}: {n / t:,.0f} users per CPU-second")
    return {"n": n, "raw_s": t_raw, "raw_n": n_raw, "parse_s": t_parse, **timings,
            "rules": len(pack.ruleset)}


def profile_range(container: Container, as_of: date) -> str:
    """cProfile of one evaluator working through one range in-process."""
    from engine.evaluate.worker import EvaluatorWorker

    c = container
    worker = EvaluatorWorker(
        c.bus.consumer("bench-profile", [c.bus.topic("jobs")]),
        c.bus,
        c.shards,
        c.rules,
        c.runs,
        budget_ms=c.settings.rule_budget_ms,
        timezone=c.settings.timezone,
    )
    store = c.shards.stores[0]
    lo, hi = store.plan_ranges(c.settings.range_target_users)[0]
    prof = cProfile.Profile()
    prof.enable()
    stats = worker._evaluate(store.scan_range(lo, hi, 256), store, as_of, None, None)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
    return f"{stats.users:,} users\n" + buf.getvalue()


# -- main ------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--workers", default="1,2", help="evaluator processes per measured night")
    ap.add_argument("--cold-workers", type=int, default=2)
    ap.add_argument("--range-users", type=int, default=25_000)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--profile", action="store_true", help="cProfile one range in-process")
    ap.add_argument("--isolation-ab", action="store_true",
                    help="run each measured night also with the rules in the evaluator process "
                         "(bench/inprocess_evaluator.py): the cost of the sandbox children")
    ap.add_argument("--incremental", type=int, default=0, metavar="NIGHTS",
                    help="after the full nights, NIGHTS incremental nights (the users due) and "
                         "a verifying one, by the last --workers count; report the fraction due")
    ap.add_argument("--keep", action="store_true", help="keep the kvbench_* databases")
    ap.add_argument("--reuse", type=int, default=0, metavar="DAY",
                    help="reuse kept kvbench_* databases whose last night was D+DAY-1: "
                         "no load, no cold night; the measured nights start at D+DAY")
    args = ap.parse_args()
    worker_counts = [int(w) for w in args.workers.split(",") if w]

    log(
        f"{args.users:,} users, {args.shards} shards, 50 rules; {os.cpu_count()} CPUs; {load_avg()}"
    )
    if args.reuse:
        sa = PG.replace("postgresql://", "postgresql+psycopg://")
        control, shard_urls = (
            f"{sa}/kvbench_control",
            [f"{sa}/kvbench_s{i}" for i in range(args.shards)],
        )
    else:
        control, shard_urls = create_databases(args.shards)
    broker = start_tansu()
    data_dir = Path(tempfile.mkdtemp(prefix="kvbench-"))
    base = Settings(
        shards=shard_urls, control_db=control, kafka_bootstrap=broker.bootstrap,
        kafka_partitions=args.partitions, range_target_users=args.range_users,
        kafka_session_timeout_ms=TEST_TIMINGS["session_timeout_ms"],
        kafka_heartbeat_interval_ms=TEST_TIMINGS["heartbeat_interval_ms"],
        kafka_fetch_wait_max_ms=TEST_TIMINGS["fetch_wait_max_ms"], data_dir=data_dir,
    )
    setup = Container(base)
    try:
        setup.migrate()
        if args.reuse:
            args.users = sum(st.count() for st in setup.shards.stores)
            nights = [{}]  # the cold night ran before
        else:
            t0 = time.perf_counter()
            load_users(setup, args.users)
            log(f"loaded {args.users:,} users in {time.perf_counter() - t0:.1f}s")
            install_pack(setup.rules, RULES50)
            nights = [night(base, AS_OF, args.cold_workers, False, COLD,
                            incremental=bool(args.incremental))]
            log(_night_line(nights[-1], args.users))
        for r in setup.rules.list():  # an earlier run on a starved machine may have
            if r["status"] == "quarantined":  # quarantined some for overrunning
                setup.rules.set_enabled(r["key"], True)
        assert len(setup.rules.active()) == 50
        first = args.reuse or 1
        day = first
        for w in worker_counts:
            nights.append(night(base, AS_OF + timedelta(days=day), w, True, f"night D+{day}"))
            log(_night_line(nights[-1], args.users))
            day += 1
            if args.isolation_ab:
                nights.append(night(base, AS_OF + timedelta(days=day), w, True,
                                    f"night D+{day} rules in-process", inprocess=True))
                log(_night_line(nights[-1], args.users))
                day += 1
                a, b = nights[-2], nights[-1]
                log(f"isolation, {w} worker(s): sandbox children {a['t_e2e']:.2f}s vs rules "
                    f"in-process {b['t_e2e']:.2f}s = {a['t_e2e'] / b['t_e2e']:.3f}x; worker CPU "
                    f"{sum(a['cpu']) / args.users * 1e6:.1f} vs "
                    f"{sum(b['cpu']) / args.users * 1e6:.1f} us/user")
        incr: list[dict[str, Any]] = []
        if args.incremental:
            incr = incremental_nights(base, AS_OF + timedelta(days=day), args.incremental,
                                      worker_counts[-1], args.users)
            day += args.incremental + 1
        last = AS_OF + timedelta(days=day - 1)
        ceil = ceilings(setup, last)
        prof = profile_range(setup, last) if args.profile else ""
        report(args, nights, ceil, prof)
        if incr:
            report_incremental(args, nights, incr, keep_due(setup, last),
                               keep_due(setup, last, within=7))
    finally:
        setup.close()
        broker.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
        if not args.keep:
            drop_databases(args.shards)


def report_incremental(args: argparse.Namespace, nights: list[dict[str, Any]],
                       incr: list[dict[str, Any]], awake: list[tuple[str, float]],
                       week: list[tuple[str, float]]) -> None:
    full = [n for n in nights if n and n["label"] not in (COLD,) and "in-process" not in n["label"]]
    regular = [n for n in incr if "verify" not in n["label"]]
    due = [n["run"]["users"] / args.users for n in regular]
    e2e = sorted(n["t_e2e"] for n in regular)
    print(f"\n=== incremental nights: {len(regular)} nights, {args.users:,} users, "
          f"{worker_counts_label(args)} evaluator(s)")
    print(f"  fraction due per night: min {min(due):.2%}, median {sorted(due)[len(due) // 2]:.2%}, "
          f"max {max(due):.2%} (goal <= 5% of a full scan)")
    print(f"  end to end per night: median {e2e[len(e2e) // 2]:.2f}s, max {e2e[-1]:.2f}s "
          f"(goal <= 10 s for 1M users)")
    if full:
        f = min(n["t_e2e"] for n in full)
        print(f"  full scan in the same run: {f:.2f}s end to end -> incremental median is "
              f"{e2e[len(e2e) // 2] / f:.3f}x of it")
    v = [n for n in incr if "verify" in n["label"]]
    if v:
        print(f"  verifying night: {v[0]['run']['mismatches']} mismatches (must be 0), "
              f"{v[0]['t_e2e']:.2f}s")
    print("  rules that keep users due tomorrow (share of a sample of users):")
    for key, share in awake[:10]:
        print(f"    {key:<40} {share:.2%}")
    print("  rules that wake users within a week (share of a sample of users):")
    for key, share in week[:10]:
        print(f"    {key:<40} {share:.2%}")
    print("  per night: " + ", ".join(f"{n['label']} {n['run']['users']:,}" for n in incr))


def worker_counts_label(args: argparse.Namespace) -> str:
    return args.workers.split(",")[-1]


def _night_line(n: dict[str, Any], users_n: int) -> str:
    info = n["run"]
    return (f"{n['label']}: {info['status']}, {info['users']:,} users, {info['enters']:,} enters, "
            f"{info['exits']:,} exits; run {n['t_run']:.2f}s, end to end {n['t_e2e']:.2f}s "
            f"({users_n / n['t_e2e']:,.0f} users/s); {n['load']}")


def report(
    args: argparse.Namespace, nights: list[dict[str, Any]], ceil: dict[str, Any], prof: str
) -> None:
    n_rules = ceil["rules"]
    print(
        "\n=== nightly run:",
        f"{args.users:,} users x {n_rules} rules, {args.shards} PostgreSQL shards, "
        f"Kafka-protocol broker (Tansu), {args.partitions} job partitions, ranges of "
        f"~{args.range_users:,}",
    )
    print(
        f"{'night':<34}{'workers':>8}{'run s':>8}{'e2e s':>8}{'users/s':>11}{'results':>9}  per "
        "worker users/s (rule-evals/s)"
    )
    nights = [n for n in nights if n]
    inproc = [n for n in nights if "in-process" in n["label"]]
    steady = [n for n in nights if n["workers"] and n["label"] != COLD and n not in inproc]
    for n in nights:
        info = n["run"]
        per = "; ".join(
            f"{v['users_per_s'] or 0:,.0f} ({(v['users_per_s'] or 0) * n_rules / 1e6:.2f}M)"
            for v in info["workers"].values()
        )
        per += f"  | worker CPU {sum(n['cpu']) / max(1, info['users']) * 1e6:.0f} us/user"
        print(f"{n['label']:<34}{n['workers']:>8}{n['t_run']:>8.2f}{n['t_e2e']:>8.2f}"
              f"{args.users / n['t_e2e']:>11,.0f}{n['results']:>9,}  {per}")
    for n in steady:
        print(f"  {n['label']}: ledger {n['ledger']}, {n['load']}")
    users_n = ceil["n"]
    io_raw = users_n / ceil["raw_s"]
    io_parsed = users_n / ceil["parse_s"]
    plain = users_n / ceil["plain"]
    sand = users_n / ceil["sandboxed"]
    eng = users_n / ceil["engine"]
    print("\n=== ceilings over the same profiles (one process)")
    print(
        f"  (b) I/O: COPY read {io_raw:,.0f} users/s raw; {io_parsed:,.0f} users/s as the "
        "evaluator "
        f"reads them (profile + state, parsed)"
    )
    print("  (CPU time of this process, the three interleaved slice by slice)")
    print(
        f"  (a) compute: plain Python {plain:,.0f} users/s ({ceil['plain'] / users_n * 1e6:.1f} "
        "us/user, "
        f"{plain * n_rules / 1e6:.2f}M rule-evals/s)"
    )
    print(
        f"      sandboxed RuleSet {sand:,.0f} users/s ({ceil['sandboxed'] / users_n * 1e6:.1f} "
        "us/user): "
        f"{ceil['sandboxed'] / ceil['plain']:.2f}x plain"
    )
    print(
        f"      engine evaluate_rows {eng:,.0f} users/s ({ceil['engine'] / users_n * 1e6:.1f} "
        "us/user): "
        f"{ceil['engine'] / ceil['plain']:.2f}x plain"
    )
    if steady:
        print("\n=== ratios (steady-state nights)")
        for n in steady:
            rate = args.users / n["t_e2e"]
            per_worker = rate / n["workers"]
            cpu_per_user = sum(n["cpu"]) / args.users
            print(
                f"  {n['workers']} worker(s): e2e {rate:,.0f} users/s = {rate / plain:.2f}x the "
                "compute "
                f"ceiling of one process, {rate / io_parsed:.2f}x the I/O ceiling; "
                f"{per_worker:,.0f} users/s per worker; worker CPU {cpu_per_user * 1e6:.1f} "
                "us/user "
                f"= {1 / cpu_per_user:,.0f} users per CPU-second "
                f"({ceil['plain'] / users_n / cpu_per_user:.2f}x "
                f"the plain-Python ceiling)"
            )
        if len(steady) >= 2:
            a, b = steady[0], steady[-1]
            print(f"  scale-out {a['workers']} -> {b['workers']} workers: "
                  f"{a['t_e2e'] / b['t_e2e']:.2f}x ({a['t_e2e']:.2f}s -> {b['t_e2e']:.2f}s)")
        best = min(n["t_e2e"] for n in steady)
        print(
            f"  best end to end: {best:.2f}s for {args.users:,} users "
            "(target < 20 s for 1M: "
            f"{'met' if best * 1_000_000 / args.users < 20 else 'not met'}); "
            f"sandboxed/plain {ceil['sandboxed'] / ceil['plain']:.2f}x (target <= 1.5x)"
        )
    if inproc:
        print("\n=== isolation: rules in sandbox children vs in the evaluator process (A/B)")
        for b in inproc:
            a = nights[nights.index(b) - 1]
            print(f"  {a['workers']} worker(s): {a['t_e2e']:.2f}s vs {b['t_e2e']:.2f}s end to end "
                  f"= {a['t_e2e'] / b['t_e2e']:.3f}x (target <= 1.05x); worker CPU incl. "
                  f"children {sum(a['cpu']) / args.users * 1e6:.1f} vs "
                  f"{sum(b['cpu']) / args.users * 1e6:.1f} us/user")
    if prof:
        print("\n=== cProfile, one range in-process (tottime)\n" + prof)


if __name__ == "__main__":
    main()
