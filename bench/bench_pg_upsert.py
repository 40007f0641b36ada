"""Which PostgreSQL statement form writes an ingest batch fastest?

    flock /tmp/kvadrupel-bench.lock .venv/bin/python bench/bench_pg_upsert.py \
        [--users 100000] [--batch 5000] [--batches 12] [--shards 4]

For each form of ``shards.backends.pg_ingest`` (unnest, copy, values,
executemany) the same sequence of batches goes through the real
``PostgresShardStore.ingest`` (marks, load, apply, write, commit) on fresh shard
databases cloned from one template that holds ``--users`` synthetic profiles;
``--shards`` shards are written concurrently, one thread each, as the ingest
worker does. Each batch touches ``--batch`` users per shard (85% existing
profiles, 15% new). Reported: time in the write statement alone and in the
whole shard transaction, as rows/s over all shards; plus a plain COPY of the
same rows into an empty table (no upsert, no index lookups): the ceiling.
Not a test; figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson  # noqa: E402
import psycopg  # noqa: E402

from bench.ingest_common import (  # noqa: E402
    create_databases,
    db_name,
    drop_databases,
    dsn,
    event,
    profiles,
)
from engine.ingest.events import apply_user
from engine.messages.event import parse_event
from shards.backends.pg_ingest import FORMS  # noqa: E402
from shards.backends.postgres import PostgresShardStore  # noqa: E402
from shards.store import IngestItem  # noqa: E402


def make_template(n_users: int) -> str:
    [url] = create_databases("shard", 1)
    with psycopg.connect(dsn(url)) as conn, conn.cursor() as cur:
        with cur.copy("COPY profiles (user_id, doc, seen, version, updated_at) FROM STDIN") as cp:
            for uid, doc in profiles(n_users):
                cp.write_row((uid, orjson.dumps(doc).decode(), "[]", 1, "2026-11-24T00:00:00Z"))
    with psycopg.connect(dsn(url), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE profiles")
    return url


def batches(
    n_users: int, per_batch: int, n_batches: int, shards: int, seed: int
) -> list[list[list[IngestItem]]]:
    """``[batch][shard] -> items``: per shard, users drawn 85% from existing profiles."""
    rng = random.Random(seed)
    out = []
    offset = 0
    new_uid = 10**12
    for _ in range(n_batches):
        per_shard = []
        for _s in range(shards):
            items = []
            for _u in range(per_batch):
                if rng.random() < 0.85:
                    uid = 1_000_001 + rng.randrange(n_users)
                else:
                    new_uid += 1
                    uid = new_uid
                ev = parse_event(orjson.dumps(event(offset, uid, rng)))
                items.append(IngestItem(uid, ev, "bench.events", 0, offset))
                offset += 1
            per_shard.append(items)
        out.append(per_shard)
    return out


WRITTEN: list[tuple[int, bytes, list[str]]] = []  # rows the timed batches wrote (first form)


def run_form(
    form: str, urls: list[str], work: list[list[list[IngestItem]]], record: bool = False
) -> dict[str, float]:
    stores = [PostgresShardStore.from_url(i, u) for i, u in enumerate(urls)]
    write_s = [0.0] * len(stores)
    for s in stores:
        s.ingest_form = form
        if form == "unnest":  # PgIngestMixin._apply_users builds the columns itself
            inner_cols = s._upsert

            def timed_cols(conn, ids, docs, seens, versions, _inner=inner_cols, _i=s.index):  # noqa: ANN001
                if record:
                    rows = zip(ids, docs, seens, strict=True)
                    WRITTEN.extend((int(u), d, orjson.loads(sn)) for u, d, sn in rows)
                t = time.perf_counter()
                _inner(conn, ids, docs, seens, versions)
                write_s[_i] += time.perf_counter() - t

            s._upsert = timed_cols  # type: ignore[method-assign]
            continue
        inner = s._write_profiles

        def timed(conn, rows, _inner=inner, _i=s.index):  # noqa: ANN001
            if record:
                WRITTEN.extend((r.user_id, r.encoded, r.seen) for r in rows)
            t = time.perf_counter()
            _inner(conn, rows)
            write_s[_i] += time.perf_counter() - t

        s._write_profiles = timed  # type: ignore[method-assign]
    apply = partial(apply_user, max_bytes=64 * 1024)
    rows = 0
    pool = ThreadPoolExecutor(len(stores))
    t0 = time.perf_counter()
    for per_shard in work:
        futs = [pool.submit(stores[i].ingest, items, apply) for i, items in enumerate(per_shard)]
        for f in futs:
            rows += len(f.result().touched)
    total = time.perf_counter() - t0
    pool.shutdown()
    for s in stores:
        s.close()
    return {"rows": rows, "total_s": total, "write_s": max(write_s), "write_sum_s": sum(write_s)}


def copy_ceiling() -> dict[str, float]:
    """COPY the rows the timed batches wrote into one plain table (no keys)."""
    rows = [(u, d.decode(), orjson.dumps(s).decode()) for u, d, s in WRITTEN]
    [url] = create_databases("shard", 1)
    try:
        with psycopg.connect(dsn(url)) as conn:
            conn.execute(
                "CREATE TABLE copy_target (user_id bigint, doc json, seen json, version bigint,"
                " updated_at timestamptz)"
            )
            conn.commit()
            t0 = time.perf_counter()
            with (
                conn.cursor() as cur,
                cur.copy(
                    "COPY copy_target (user_id, doc, seen, version, updated_at) FROM STDIN"
                ) as cp,
            ):
                for uid, doc, seen in rows:
                    cp.write_row((uid, doc, seen, 1, "2026-11-24T00:00:00Z"))
            conn.commit()
            t = time.perf_counter() - t0
    finally:
        drop_databases([url])
    return {"rows": len(rows), "total_s": t}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=1250, help="users per shard per batch")
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--forms", nargs="*", default=list(FORMS))
    args = ap.parse_args()

    print(
        f"template: {args.users:,} profiles; {args.batches} batches x {args.shards} shards x "
        f"{args.batch} users",
        flush=True,
    )
    template = make_template(args.users)
    work = batches(args.users, args.batch, args.batches, args.shards, seed=3)
    try:
        results = {}
        for form in args.forms:
            urls = create_databases("shard", args.shards, template=db_name(template))
            try:
                # One warm-up batch (connections, prepared statements), then the timed ones.
                run_form(form, urls, work[:1])
                r = run_form(form, urls, work[1:], record=not WRITTEN)
            finally:
                drop_databases(urls)
            results[form] = r
            print(
                f"  {form:<12} write {r['rows'] / r['write_sum_s'] * args.shards:>9,.0f} rows/s "
                f"(statement)  shard tx {r['rows'] / r['total_s']:>9,.0f} rows/s (whole batch)",
                flush=True,
            )
        c = copy_ceiling()
        print(
            f"  {'plain COPY':<12} {c['rows'] / c['total_s']:>15,.0f} rows/s (one table, one "
            "connection, no upsert)"
        )
    finally:
        drop_databases([template])


if __name__ == "__main__":
    main()
