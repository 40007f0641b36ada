"""End-to-end ingest throughput: Kafka → ingest worker(s) → 4 PostgreSQL shards.

    flock /tmp/kvadrupel-bench.lock .venv/bin/python bench/bench_ingest.py \
        [--events 1000000] [--users 200000] [--workers 1] [--shards 4] [--partitions 8] \
        [--cache N] [--pipeline N] [--empty] [--py-spy]

1. Starts a Tansu broker (memory storage, loopback) and creates ``--shards`` shard
   databases and a control database on the local PostgreSQL; unless ``--empty``,
   loads every user's synthetic profile first (a portal's users exist already).
2. Produces ``--events`` realistic events (``bench/ingest_common.py``: orders,
   licence and e-mail changes, visits...) for users drawn uniformly at random,
   keyed by user id (idempotent producer, acks=all), and records each
   partition's last offset. Timed on its own.
3. Starts ``--workers`` real ``kvadrupel ingest`` processes and measures until
   the last profile is written: every partition's last offset is in some
   shard's ``ingest_marks``, i.e. committed together with the profiles.
4. In the same run, the ceiling: a plain COPY of the same final rows (user_id,
   doc, seen, version, updated_at) into one table like ``profiles`` (same types,
   primary key and fill factor), one connection, one transaction; the fastest
   of 3.
5. Checks a sample of users against the one-by-one result of their events.

Printed: events/s (from the first batch written to the last; and including the
workers' start and group join), the COPY ceiling as rows/s, and the ratios:
events/s ÷ COPY rows/s (the target: each event is one profile update, and
COPYing one row per event is the ceiling), profile rows written/s ÷ COPY
rows/s, and events/s ÷ (N ÷ the COPY time of the final rows: an event-for-row
comparison that treats coalescing 5 events into 1 row as free). ``--py-spy``
samples worker 0 with py-spy and prints where its time goes (a profiling tool,
not a project dependency: ``.venv/bin/pip install py-spy`` first).
Not a test; figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson  # noqa: E402
import psycopg  # noqa: E402
from confluent_kafka import Producer  # noqa: E402

from bench.ingest_common import (  # noqa: E402
    create_databases,
    drop_databases,
    dsn,
    event,
    profiles,
    user_ids,
)
from engine.buses.kafka import KafkaBus  # noqa: E402
from shards.router import ShardRouter  # noqa: E402
from tests.engine.test_events import oracle  # noqa: E402
from tests.fixtures.kafka import TEST_TIMINGS, start_tansu  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def preload(shard_urls: list[str], n_users: int) -> None:
    router = ShardRouter.uniform(len(shard_urls))  # = the default bucket map the workers load
    conns = [psycopg.connect(dsn(u)) for u in shard_urls]
    with contextlib.ExitStack() as stack:
        cps = [
            stack.enter_context(
                c.cursor().copy(
                    "COPY profiles (user_id, doc, seen, version, updated_at) FROM STDIN"
                )
            )
            for c in conns
        ]
        for uid, doc in profiles(n_users):
            cps[router.shard_of(uid)].write_row(
                (uid, orjson.dumps(doc).decode(), "[]", 1, "2026-11-24T00:00:00Z")
            )
    for conn in conns:
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE profiles")
        conn.close()


def produce(
    bootstrap: str, topic: str, n_events: int, n_users: int
) -> tuple[dict[int, int], float, list]:
    """Publish the events; return each partition's last offset, the seconds taken,
    and a sample of (user, [event dicts]) for the correctness check."""
    last: dict[int, int] = {}
    errors: list[str] = []

    def on_delivery(err, msg) -> None:  # noqa: ANN001
        if err is not None:
            errors.append(str(err))
        elif msg.offset() > last.get(msg.partition(), -1):
            last[msg.partition()] = msg.offset()

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
            "partitioner": "murmur2_random",
            "queue.buffering.max.messages": 500_000,
        }
    )
    rng = random.Random(11)
    ids = user_ids(n_users)
    sample_users = set(rng.sample(ids, min(2000, n_users)))
    sample: dict[int, list] = collections.defaultdict(list)
    t0 = time.perf_counter()
    for i in range(n_events):
        uid = ids[rng.randrange(n_users)]
        ev = event(i, uid, rng)
        if uid in sample_users:
            sample[uid].append(ev)
        while True:
            try:
                producer.produce(
                    topic, orjson.dumps(ev), str(uid).encode(), on_delivery=on_delivery
                )
                break
            except BufferError:
                producer.poll(0.05)
        if i % 10000 == 0:
            producer.poll(0)
    producer.flush(120)
    took = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{len(errors)} events not delivered: {errors[0]}")
    return last, took, list(sample.items())


def marks_done(
    conns: list[psycopg.Connection], topic: str, last: dict[int, int]
) -> tuple[bool, bool]:
    """(anything written yet, everything written). ``conns``: one open autocommit
    connection per shard (a new connection every 50 ms would cost the machine
    more CPU than the query: a backend fork and authentication each time)."""
    best: dict[int, int] = {}
    for conn in conns:
        for p, off in conn.execute(
            'SELECT partition, "offset" FROM ingest_marks WHERE topic = %s', (topic,)
        ):
            best[p] = max(best.get(p, -1), off)
    started = any(o >= 0 for o in best.values())
    return started, all(best.get(p, -1) >= off for p, off in last.items())


def copy_ceiling(shard_urls: list[str], tries: int = 3) -> tuple[int, float, int]:
    """COPY the final rows of every shard into one table like ``profiles`` (same
    column types, primary key and storage parameters); (rows, seconds of the
    fastest of ``tries`` COPYs, row writes)."""
    rows = []
    for url in shard_urls:
        with psycopg.connect(dsn(url)) as conn:
            rows += conn.execute(
                "SELECT user_id, doc::text, seen::text, version, updated_at FROM profiles"
            ).fetchall()
    [scratch] = create_databases("shard", 1)
    best = float("inf")
    try:
        with psycopg.connect(dsn(scratch)) as conn:
            for i in range(tries):
                conn.execute(f"CREATE TABLE copy_target{i} (LIKE profiles INCLUDING ALL)")
                conn.commit()
                t0 = time.perf_counter()
                with (
                    conn.cursor() as cur,
                    cur.copy(
                        f"COPY copy_target{i} (user_id, doc, seen, version, updated_at) FROM STDIN"
                    ) as cp,
                ):
                    for r in rows:
                        cp.write_row(r)
                conn.commit()
                best = min(best, time.perf_counter() - t0)
    finally:
        drop_databases([scratch])
    writes = sum(r[3] for r in rows)
    return len(rows), best, writes


def check_sample(shard_urls: list[str], sample: list, preloaded: bool) -> int:
    from engine.messages.event import parse_event

    router = ShardRouter.uniform(len(shard_urls))
    conns = [psycopg.connect(dsn(u)) for u in shard_urls]
    base = dict(profiles(max(u for u, _ in sample) - 1_000_000)) if preloaded else {}
    bad = 0
    for uid, evs in sample:
        got = (
            conns[router.shard_of(uid)]
            .execute("SELECT doc::text FROM profiles WHERE user_id = %s", (uid,))
            .fetchone()
        )
        expected = oracle([parse_event(e) for e in evs], 64 * 1024, None) if not preloaded else None
        if preloaded:
            from engine.ingest.events import apply_user

            expected = apply_user(
                base[uid], [], [parse_event(e) for e in evs], max_bytes=64 * 1024, seen_cap=10_000
            ).doc
        if orjson.loads(got[0]) != expected:
            bad += 1
    for c in conns:
        c.close()
    return bad


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (and their threads), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def postgres_pids() -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() in ("postgres", "postmaster"):
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def py_spy_summary(path: Path, top: int = 22) -> str:
    """Self and inclusive shares per function from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        count = int(n)
        frames = [
            f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1]
            for f in stack.split(";")
            if f
        ]
        total += count
        if frames:
            own[frames[-1]] += count
            for f in set(frames):
                incl[f] += count
    lines = [f"  samples: {total}", "  self time:"]
    lines += [f"    {100 * c / total:5.1f}%  {f}" for f, c in own.most_common(top)]
    lines.append("  inclusive (our code):")
    ours = [
        (f, c)
        for f, c in incl.most_common()
        if any(
            m in f
            for m in ("ingest.py", "events.py", "sql.py", "pg_ingest.py", "kafka.py", "worker.py")
        )
    ]
    lines += [f"    {100 * c / total:5.1f}%  {f}" for f, c in ours[:top]]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=200_000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument(
        "--cache", type=int, default=None, help="KVADRUPEL_INGEST_CACHE_USERS (default: setting)"
    )
    ap.add_argument("--pipeline", type=int, default=None, help="KVADRUPEL_INGEST_PIPELINE")
    ap.add_argument("--batch", type=int, default=None, help="KVADRUPEL_INGEST_BATCH_MAX")
    ap.add_argument("--empty", action="store_true", help="start with no profiles")
    ap.add_argument("--py-spy", action="store_true", help="profile worker 0 with py-spy")
    ap.add_argument(
        "--py-spy-gil",
        action="store_true",
        help="with --py-spy: sample only the thread holding the GIL (where the Python CPU goes)",
    )
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    broker = start_tansu(tmp)
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    shard_urls = create_databases("shard", args.shards)
    [control] = create_databases("control", 1)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        bus = KafkaBus(broker.bootstrap, prefix)
        bus.ensure_topics(bus.topics.values(), args.partitions)
        bus.close()
        topic = f"{prefix}.events"
        if not args.empty:
            t = time.perf_counter()
            preload(shard_urls, args.users)
            print(
                f"preloaded {args.users:,} profiles in {time.perf_counter() - t:.1f}s", flush=True
            )
        last, produce_s, sample = produce(broker.bootstrap, topic, args.events, args.users)
        print(
            f"produced {args.events:,} events in {produce_s:.1f}s "
            f"({args.events / produce_s:,.0f}/s) "
            f"over {len(last)} partitions",
            flush=True,
        )

        env = {
            **os.environ,
            "KVADRUPEL_SHARDS": ",".join(shard_urls),
            "KVADRUPEL_CONTROL_DB": control,
            "KVADRUPEL_KAFKA_BOOTSTRAP": broker.bootstrap,
            "KVADRUPEL_KAFKA_TOPIC_PREFIX": prefix,
            "KVADRUPEL_KAFKA_PARTITIONS": str(args.partitions),
            "KVADRUPEL_KAFKA_SESSION_TIMEOUT_MS": str(TEST_TIMINGS["session_timeout_ms"]),
            "KVADRUPEL_KAFKA_HEARTBEAT_INTERVAL_MS": str(TEST_TIMINGS["heartbeat_interval_ms"]),
            "KVADRUPEL_LOG_LEVEL": "WARNING",
        }
        for opt, var in (
            (args.cache, "INGEST_CACHE_USERS"),
            (args.pipeline, "INGEST_PIPELINE"),
            (args.batch, "INGEST_BATCH_MAX"),
        ):
            if opt is not None:
                env[f"KVADRUPEL_{var}"] = str(opt)
        # Write the bucket map now: workers starting together would race to create it.
        from shards.shardset import control_engine, load_router

        ctl = control_engine(control)
        load_router(ctl, args.shards)
        ctl.dispose()
        kv = str(ROOT / ".venv" / "bin" / "kvadrupel")
        t_start = time.perf_counter()
        for i in range(args.workers):
            log = (tmp / f"worker{i}.log").open("wb")
            procs.append(
                subprocess.Popen(
                    [kv, "ingest"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
                )
            )
        spy = None
        t_first = None
        watch = [psycopg.connect(dsn(u), autocommit=True) for u in shard_urls]
        while True:
            started, done = marks_done(watch, topic, last)
            now = time.perf_counter()
            if started and t_first is None:
                t_first = now
                load0 = os.getloadavg()[0]
                cpu0 = (
                    cpu_seconds([p.pid for p in procs]),
                    cpu_seconds(postgres_pids()),
                    cpu_seconds([broker.process.pid]),
                )
                if args.py_spy:
                    spy = subprocess.Popen(
                        [
                            str(ROOT / ".venv" / "bin" / "py-spy"),
                            "record",
                            "--pid",
                            str(procs[0].pid),
                            "--format",
                            "raw",
                            "--threads",
                            "--rate",
                            "200",
                            "--nonblocking",
                            *(["--gil"] if args.py_spy_gil else []),
                            "-o",
                            str(tmp / "spy.txt"),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
            if done:
                t_end = now
                cpu1 = (
                    cpu_seconds([p.pid for p in procs]),
                    cpu_seconds(postgres_pids()),
                    cpu_seconds([broker.process.pid]),
                )
                break
            if any(p.poll() is not None for p in procs):
                raise SystemExit(f"a worker exited:\n{(tmp / 'worker0.log').read_text()[-3000:]}")
            if now - t_start > 1800:
                raise SystemExit("not done after 30 minutes")
            time.sleep(0.05)
        for c in watch:
            c.close()
        if spy is not None:
            spy.send_signal(2)
            spy.wait(30)
        assert t_first is not None
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        steady = t_end - t_first
        total = t_end - t_start
        rows, copy_s, versions = copy_ceiling(shard_urls)
        writes = versions - (0 if args.empty else args.users)
        bad = check_sample(shard_urls, sample, preloaded=not args.empty)

        eps = args.events / steady
        copy_rows_s = rows / copy_s
        print(
            f"\ningest: {args.events:,} events, {args.users:,} users, "
            f"{args.workers} worker process(es), "
            f"{args.shards} shards, {args.partitions} partitions"
        )
        print(
            f"  end to end          {eps:>10,.0f} events/s   "
            f"({steady:.1f}s first batch → last profile;"
            f" {args.events / total:,.0f}/s incl. {t_first - t_start:.1f}s start + group join)"
        )
        print(
            f"  profile writes      {writes:>10,} rows      ({writes / steady:,.0f} rows/s; "
            f"{args.events / max(writes, 1):.2f} events per row written)"
        )
        print(
            f"  plain COPY ceiling  {copy_rows_s:>10,.0f} rows/s     "
            f"({rows:,} final rows in {copy_s:.2f}s, "
            "one table like profiles, one connection)"
        )
        print(
            f"  ratio               {eps / copy_rows_s:>10.1%}      "
            "end-to-end events/s ÷ COPY rows/s "
            "(each event is a profile update: one row COPYed per event is the ceiling)"
        )
        print(
            f"                      {(writes / steady) / copy_rows_s:>10.1%}      "
            "profile rows/s written by "
            "ingest ÷ COPY rows/s"
        )
        print(
            f"                      {eps / (args.events / copy_s):>10.1%}      "
            "end-to-end events/s ÷ "
            f"(N ÷ COPY time of the {rows:,} final rows = {args.events / copy_s:,.0f}/s)"
        )
        print(
            f"  check               {len(sample) - bad}/{len(sample)} "
            "sampled users equal the one-by-one result"
        )
        w_cpu, pg_cpu, k_cpu = (b - a for a, b in zip(cpu0, cpu1, strict=True))
        print(
            f"  CPU in the window   workers {w_cpu:.1f}s ({w_cpu / steady:.0%} of a core, "
            f"{w_cpu / args.events * 1e6:.1f} µs/event), PostgreSQL {pg_cpu:.1f}s "
            f"({pg_cpu / args.events * 1e6:.1f} µs/event, all backends on the server), "
            f"broker {k_cpu:.1f}s; load average {load0:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at "
            f"the end, on {os.cpu_count()} CPUs"
        )
        if spy is not None and (tmp / "spy.txt").exists():
            print(
                "\nwhere worker 0 spends its time "
                "(py-spy, all threads; idle = waiting on PostgreSQL/Kafka):"
            )
            print(py_spy_summary(tmp / "spy.txt"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        broker.stop()
        drop_databases(shard_urls + [control])


if __name__ == "__main__":
    main()
