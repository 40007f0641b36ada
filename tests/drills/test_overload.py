"""Overload drills.

* Ingest: events produced several times faster than one ``kvadrupel ingest``
  process applies them. The broker holds the backlog (a pull consumer is its own
  backpressure); the worker's memory (RSS of the subprocess, from /proc) stays
  bounded while the backlog is far larger than that, and nothing is lost: every
  user's counter equals the number of events produced for it.
* Banner API: with every banner read stuck behind a locked table, a burst of
  requests past ``api_max_inflight`` is answered at once with 503 + Retry-After
  (api/shedding.py) instead of every request waiting until it times out; without
  shedding (``api_max_inflight=0``) the same burst times out.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
import uvicorn
from sqlalchemy import text

from api.app import create_app
from kvadrupel.container import Container
from kvadrupel.settings import Settings
from tests.drills.kit import Worker, table, wait_for, worker_env, write_summary

pytestmark = [pytest.mark.drill, pytest.mark.postgres]

TOKENS = {"admin_token": "adm-" + "o" * 20, "ingest_token": "ing-" + "o" * 20,
          "portal_token": "por-" + "o" * 20}


@pytest.mark.kafka
def test_ingest_overload_memory_bounded_nothing_lost(pg_factory: Any, kafka_broker: Any,
                                                     tmp_path: Path) -> None:
    n_events, n_users, pad = int(os.environ.get("DRILL_N", "200000")), 4_000, "x" * 1500
    dbs = pg_factory(2)
    prefix = f"ovl{uuid.uuid4().hex[:8]}"
    s = Settings(data_dir=tmp_path / "data", shards=dbs.shards, control_db=dbs.control,
                 kafka_bootstrap=kafka_broker.bootstrap, kafka_topic_prefix=prefix, kafka_partitions=4,
                 kafka_session_timeout_ms=2000, kafka_heartbeat_interval_ms=500,
                 kafka_fetch_wait_max_ms=20, **TOKENS)
    c = Container(s)
    env = worker_env(shards=dbs.shards, control=dbs.control, bootstrap=kafka_broker.bootstrap,
                     prefix=prefix, data_dir=tmp_path / "data", smtp_url="", tokens=TOKENS,
                     **({"KVADRUPEL_KAFKA_EXTRA": os.environ["DRILL_EXTRA"]} if "DRILL_EXTRA" in os.environ else {}))
    ingest = Worker("ingest", env, tmp_path / "ingest.log")
    try:
        c.migrate()
        c.bus.ensure_topics(c.bus.topics.values(), 4)
        ingest.start()
        wait_for(lambda: ingest.rss_kib() > 0 and ingest.proc.poll() is None, "ingest started", 20)
        time.sleep(4)  # joined its group, imports done: the baseline
        base_rss = ingest.rss_kib()
        per_user = [0] * n_users
        # incompressible padding (lz4 on the wire): the backlog costs what it says
        pads = [os.urandom(len(pad) // 2).hex() for _ in range(64)]
        produced = {"s": 0.0}

        def produce() -> None:
            t0 = time.monotonic()
            topic = c.bus.topic("events")
            for i in range(n_events):
                u = (i * 31) % n_users
                per_user[u] += 1
                uid = 9_000_000 + u
                c.bus.publish(topic, orjson.dumps({"event_id": f"o{i}", "user_id": uid,
                                                   "inc": {"n": 1}, "set": {"pad": pads[i % 64]}}),
                              key=str(uid).encode())
            c.bus.flush(120)
            produced["s"] = time.monotonic() - t0

        t_start = time.monotonic()
        producer = threading.Thread(target=produce, daemon=True)
        producer.start()

        def applied() -> int:
            total = 0
            for store in c.shards.stores:
                with store.engine.connect() as conn:
                    total += conn.execute(text(
                        "SELECT coalesce(sum((doc->>'n')::bigint), 0) FROM profiles")).scalar()
            return int(total)

        peak, samples, backlog_peak, last_check, done = base_rss, 0, 0, 0.0, 0
        while True:
            peak = max(peak, ingest.rss_kib())
            samples += 1
            now = time.monotonic()
            if now - last_check > 0.5:
                last_check = now
                done = applied()
                sent = sum(per_user)
                backlog_peak = max(backlog_peak, sent - done)
                if done >= n_events:
                    break
                assert now - t_start < 90, f"ingest applied {done} of {n_events}"
            assert ingest.proc.poll() is None, ingest.log.read_text()[-2000:]
            time.sleep(0.05)
        drain_s = time.monotonic() - t_start
        producer.join(timeout=5)

        # nothing lost, nothing applied twice
        got: dict[int, int] = {}
        for store in c.shards.stores:
            with store.engine.connect() as conn:
                got.update(conn.execute(text("SELECT user_id, (doc->>'n')::bigint FROM profiles")).all())
        lost = sum(1 for u in range(n_users) if got.get(9_000_000 + u) != per_user[u])
        event_bytes = len(orjson.dumps({"event_id": "o100000", "user_id": 9_000_000, "inc": {"n": 1},
                                        "set": {"pad": pad}}))
        growth_mib = (peak - base_rss) / 1024
        backlog_mib = backlog_peak * event_bytes / 2**20
        produce_rate, ingest_rate = n_events / produced["s"], n_events / drain_s
        text_ = table([
            ("events", n_events), ("users", n_users), ("event size (bytes)", event_bytes),
            ("produce rate (events/s)", f"{produce_rate:,.0f}"),
            ("ingest rate (events/s)", f"{ingest_rate:,.0f}"),
            ("overload factor", f"{produce_rate / ingest_rate:.1f}x"),
            ("peak backlog (events)", f"{backlog_peak:,} (~{backlog_mib:.0f} MiB)"),
            ("ingest RSS baseline (MiB)", f"{base_rss / 1024:.0f}"),
            ("ingest RSS peak (MiB)", f"{peak / 1024:.0f} (+{growth_mib:.0f}, {samples} samples)"),
            ("users with a wrong count", lost),
        ], "Kvadrupel overload: ingest")
        print("\n" + text_)
        write_summary(text_)
        assert lost == 0
        assert growth_mib < 256, text_  # bounded: not the backlog
    finally:
        ingest.stop()
        c.close()


def _serve(app: Any) -> tuple[uvicorn.Server, threading.Thread, int]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error",
                                           access_log=False, backlog=2048))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "API server started", 15, 0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, port


async def _burst(port: int, n: int, timeout: float) -> list[tuple[str, float, str | None]]:
    """``n`` concurrent GETs of distinct users' banners: (outcome, seconds, Retry-After)."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    headers = {"Authorization": f"Bearer {TOKENS['portal_token']}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, headers=headers,
                                 timeout=timeout) as client:
        async def one(i: int) -> tuple[str, float, str | None]:
            t0 = time.monotonic()
            try:
                r = await client.get(f"/v1/users/{8_000_000 + i}/banners")
            except httpx.TimeoutException:
                return "timeout", time.monotonic() - t0, None
            return str(r.status_code), time.monotonic() - t0, r.headers.get("retry-after")
        return await asyncio.gather(*(one(i) for i in range(n)))


def test_banner_api_sheds_load_with_503_retry_after(pg_factory: Any, tmp_path: Path) -> None:
    n, inflight, lock_s, client_timeout = 200, 16, 3.0, 2.0
    dbs = pg_factory(2)
    rows: list[tuple[str, Any]] = []
    outcomes: dict[int, list[tuple[str, float, str | None]]] = {}
    for max_inflight in (0, inflight):
        s = Settings(data_dir=tmp_path / f"data{max_inflight}", shards=dbs.shards, control_db=dbs.control,
                     api_max_inflight=max_inflight, **TOKENS)
        c = Container(s)
        server, thread, port = _serve(create_app(c))
        locks = [psycopg.connect(u.replace("postgresql+psycopg://", "postgresql://")) for u in dbs.shards]
        try:
            for conn in locks:  # every banner read now waits for the lock
                conn.execute("LOCK TABLE banner_sets, banners IN ACCESS EXCLUSIVE MODE")
            releaser = threading.Timer(lock_s, lambda: [conn.rollback() for conn in locks])
            releaser.start()
            t0 = time.monotonic()
            got = asyncio.run(_burst(port, n, client_timeout))
            releaser.join()
            outcomes[max_inflight] = got
            after = asyncio.run(_burst(port, 20, 5.0))  # the lock is gone: served again
            assert {o for o, _, _ in after} == {"200"}, after
            shed = [g for g in got if g[0] == "503"]
            label = f"max_inflight={max_inflight or 'off'}"
            rows += [
                (f"{label}: requests", n),
                (f"{label}: 503 + Retry-After", sum(1 for g in shed if g[2])),
                (f"{label}: timeouts ({client_timeout:.0f} s)", sum(1 for g in got if g[0] == "timeout")),
                (f"{label}: other", sum(1 for g in got if g[0] not in ("503", "timeout"))),
                (f"{label}: slowest 503 (s)", f"{max((g[1] for g in shed), default=0):.2f}"),
                (f"{label}: burst wall (s)", f"{time.monotonic() - t0:.2f}"),
            ]
        finally:
            for conn in locks:
                conn.close()
            server.should_exit = True
            thread.join(timeout=10)
            c.close()
    text_ = table(rows, f"Kvadrupel overload: banner API (DB reads blocked {lock_s:.0f} s)")
    print("\n" + text_)
    write_summary(text_)
    off, on = outcomes[0], outcomes[inflight]
    assert sum(1 for g in off if g[0] == "timeout") >= n - 16, text_  # without shedding: timeouts
    shed = [g for g in on if g[0] == "503"]
    assert len(shed) >= n - inflight, text_
    assert all(g[2] for g in shed), text_  # every 503 says when to retry
    waits = sorted(g[1] for g in shed)
    assert waits[-1] < client_timeout and waits[len(waits) // 2] < 0.75, text_  # at once, not timed out
