"""Preview and forecast speed: is it interactive? (issue 3)

Loads N synthetic users (default 100,000) into 2 shards (PostgreSQL databases made
for the run and dropped after, or SQLite with --sqlite), then times a preview over
everyone, a sampled preview, and a 30-day forecast over a sample, for the built-in
rules. Prints seconds, profiles/s, and the ratio to the 5 s target.

    .venv/bin/python bench/bench_preview.py [--users 100000] [--sqlite]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from datetime import date
from pathlib import Path

import psycopg

from kvadrupel.container import Container
from kvadrupel.demo import install_pack
from kvadrupel.settings import Settings
from kvadrupel.synthetic import users
from rules.pack import BUILTIN_RULES

PG = "postgresql+psycopg://postgres@127.0.0.1:5432"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--sqlite", action="store_true")
    args = ap.parse_args()
    as_of = date(2026, 11, 24)
    tmp = Path(tempfile.mkdtemp())
    names: list[str] = []
    if args.sqlite:
        settings = Settings(data_dir=tmp)
    else:
        tag = uuid.uuid4().hex[:6]
        names = [f"kvbench_{tag}_c", f"kvbench_{tag}_s0", f"kvbench_{tag}_s1"]
        with psycopg.connect("postgresql://postgres@127.0.0.1/postgres", autocommit=True) as conn:
            for n in names:
                conn.execute(f'CREATE DATABASE "{n}"')
        settings = Settings(data_dir=tmp, control_db=f"{PG}/{names[0]}",
                            shards=[f"{PG}/{n}" for n in names[1:]])
    c = Container(settings)
    try:
        c.migrate()
        install_pack(c.rules, BUILTIN_RULES)
        t = time.perf_counter()
        docs = list(users(args.users, as_of))
        for shard, uids in c.shards.router.split(u for u, _ in docs).items():
            by = dict(docs)
            store = c.shards.stores[shard]
            for i in range(0, len(uids), 5000):
                store.put_profiles([(u, by[u]) for u in uids[i:i + 5000]])
        if not args.sqlite:
            for s in c.shards.stores:
                with s.engine.begin() as conn:
                    conn.exec_driver_sql("ANALYZE profiles")
        print(f"loaded {args.users:,} users into 2 {'SQLite' if args.sqlite else 'PostgreSQL'} "
              f"shards in {time.perf_counter() - t:.1f}s")
        print(f"{'question':<44}{'seconds':>9}{'profiles/s':>12}{'target 5 s':>12}")
        for key in ("dl-expiring", "birthday"):
            for label, call in (
                (f"preview {key} over all", lambda k=key: c.rules.preview(k, as_of, "all")),
                (f"preview {key} sample 20k", lambda k=key: c.rules.preview(k, as_of, 20_000)),
                (
                    f"forecast {key} 30 days, sample 20k",
                    lambda k=key: c.rules.forecast(k, as_of, 30, 20_000),
                ),
            ):
                t = time.perf_counter()
                out = call()
                dt = time.perf_counter() - t
                print(f"{label:<44}{dt:>9.2f}{out['evaluated'] / dt:>12,.0f}{5.0 / dt:>11.1f}x")
    finally:
        c.close()
        if names:
            with psycopg.connect(
                "postgresql://postgres@127.0.0.1/postgres", autocommit=True
            ) as conn:
                for n in names:
                    conn.execute(f'DROP DATABASE IF EXISTS "{n}" WITH (FORCE)')


if __name__ == "__main__":
    main()
