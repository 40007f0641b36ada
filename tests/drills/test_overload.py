"""Overload drills.

* Ingest: events produced several times faster than one ``kvadrupel ingest``
  process applies them. The broker holds the backlog (a pull consumer is its own
  backpressure); the worker's memory (RSS of the subprocess, from /proc) stays
  under a fixed cap (``RSS_CAP_MIB``) whatever the backlog, and nothing is lost:
  every user's counter equals the number of events produced for it.
  ``KVADRUPEL_DRILL_OVERLOAD_EVENTS`` (200,000) sets the backlog;
  ``KVADRUPEL_DRILL_KAFKA_EXTRA`` passes ``KVADRUPEL_KAFKA_EXTRA`` to the worker
  (e.g. ``{"consumer.queued.max.messages.kbytes": "16384"}``) to try a tuning.
* Banner API: with every banner read stuck behind a locked table, a burst of
  requests past ``api_max_inflight`` is answered at once with 503 + Retry-After
  (api/shedding.py) instead of every request waiting until it times out; without
  shedding (``api_max_inflight=0``) the same burst times out.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from sqlalchemy import text

from kvadrupel.container import Container
from kvadrupel.settings import Settings
from tests.drills.kit import ROOT, Worker, table, worker_env, write_summary
from tests.fixtures.kafka import _free_port
from tests.fixtures.waiting import scaled, wait_for

pytestmark = [pytest.mark.drill, pytest.mark.postgres]

RSS_CAP_MIB = 400  # growth of the ingest process's RSS under overload
TOKENS = {
    "admin_token": "adm-" + "o" * 20,
    "ingest_token": "ing-" + "o" * 20,
    "portal_token": "por-" + "o" * 20,
}


@pytest.mark.kafka
def test_ingest_overload_memory_bounded_nothing_lost(
    pg_factory: Any, kafka_broker: Any, tmp_path: Path
) -> None:
    n_events, n_users, pad = (
        int(os.environ.get("KVADRUPEL_DRILL_OVERLOAD_EVENTS", "200000")),
        4_000,
        "x" * 1500,
    )
    dbs = pg_factory(2)
    prefix = f"ovl{uuid.uuid4().hex[:8]}"
    s = Settings(
        data_dir=tmp_path / "data",
        shards=dbs.shards,
        control_db=dbs.control,
        kafka_bootstrap=kafka_broker.bootstrap,
        kafka_topic_prefix=prefix,
        kafka_partitions=4,
        kafka_session_timeout_ms=2000,
        kafka_heartbeat_interval_ms=500,
        kafka_fetch_wait_max_ms=20,
        **TOKENS,
    )
    c = Container(s)
    env = worker_env(
        shards=dbs.shards,
        control=dbs.control,
        bootstrap=kafka_broker.bootstrap,
        prefix=prefix,
        data_dir=tmp_path / "data",
        smtp_url="",
        tokens=TOKENS,
        **(
            {"KVADRUPEL_KAFKA_EXTRA": os.environ["KVADRUPEL_DRILL_KAFKA_EXTRA"]}
            if "KVADRUPEL_DRILL_KAFKA_EXTRA" in os.environ
            else {}
        ),
    )
    ingest = Worker("ingest", env, tmp_path / "ingest.log")
    try:
        c.migrate()
        c.bus.ensure_topics(c.bus.topics.values(), 4)
        ingest.start()
        wait_for(lambda: ingest.rss_kib() > 0 and ingest.proc.poll() is None, "ingest started",
                 timeout=20, every=0.1)
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
                c.bus.publish(
                    topic,
                    orjson.dumps(
                        {
                            "event_id": f"o{i}",
                            "user_id": uid,
                            "inc": {"n": 1},
                            "set": {"pad": pads[i % 64]},
                        }
                    ),
                    key=str(uid).encode(),
                )
            c.bus.flush(120)
            produced["s"] = time.monotonic() - t0

        t_start = time.monotonic()
        producer = threading.Thread(target=produce, daemon=True)
        producer.start()

        def applied() -> int:
            total = 0
            for store in c.shards.stores:
                with store.engine.connect() as conn:
                    total += conn.execute(
                        text("SELECT coalesce(sum((doc->>'n')::bigint), 0) FROM profiles")
                    ).scalar()
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
                assert now - t_start < scaled(90), f"ingest applied {done} of {n_events}"
            assert ingest.proc.poll() is None, ingest.log.read_text()[-2000:]
            time.sleep(0.05)
        drain_s = time.monotonic() - t_start
        producer.join(timeout=5)

        # nothing lost, nothing applied twice
        got: dict[int, int] = {}
        for store in c.shards.stores:
            with store.engine.connect() as conn:
                got.update(
                    conn.execute(text("SELECT user_id, (doc->>'n')::bigint FROM profiles")).all()
                )
        lost = sum(1 for u in range(n_users) if got.get(9_000_000 + u) != per_user[u])
        event_bytes = len(
            orjson.dumps(
                {"event_id": "o100000", "user_id": 9_000_000, "inc": {"n": 1}, "set": {"pad": pad}}
            )
        )
        growth_mib = (peak - base_rss) / 1024
        backlog_mib = backlog_peak * event_bytes / 2**20
        produce_rate, ingest_rate = n_events / produced["s"], n_events / drain_s
        text_ = table(
            [
                ("events", n_events),
                ("users", n_users),
                ("event size (bytes)", event_bytes),
                ("produce rate (events/s)", f"{produce_rate:,.0f}"),
                ("ingest rate (events/s)", f"{ingest_rate:,.0f}"),
                ("overload factor", f"{produce_rate / ingest_rate:.1f}x"),
                ("peak backlog (events)", f"{backlog_peak:,} (~{backlog_mib:.0f} MiB)"),
                ("ingest RSS baseline (MiB)", f"{base_rss / 1024:.0f}"),
                (
                    "ingest RSS peak (MiB)",
                    f"{peak / 1024:.0f} (+{growth_mib:.0f}, {samples} samples)",
                ),
                ("users with a wrong count", lost),
            ],
            "Kvadrupel overload: ingest",
        )
        print("\n" + text_)
        write_summary(text_)
        assert lost == 0
        # Bounded: measured +284 MiB at a 285 MiB backlog and +309 MiB at 496 MiB (librdkafka
        # prefetch + batches in flight + allocator); a cap, not a function of the backlog.
        assert growth_mib < RSS_CAP_MIB, text_
    finally:
        ingest.stop()
        c.close()


def _api(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(  # noqa: S603 - our own CLI
        [sys.executable, "-m", "kvadrupel.cli", "api", "--port", str(port), "--workers", "1"],
        cwd=ROOT,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )

    def up() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, f"the API serving /healthz on port {port}", timeout=30, every=0.1)
    return proc


async def _burst(port: int, n: int, timeout: float) -> list[tuple[str, float, str | None]]:
    """``n`` concurrent GETs of distinct users' banners: (outcome, seconds, Retry-After);
    ``timeout`` bounds each whole request (the client gives up, as a portal would)."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    headers = {"Authorization": f"Bearer {TOKENS['portal_token']}"}
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", limits=limits, headers=headers, timeout=30
    ) as client:

        async def one(i: int) -> tuple[str, float, str | None]:
            t0 = time.monotonic()
            try:
                r = await asyncio.wait_for(
                    client.get(f"/v1/users/{8_000_000 + i}/banners"), timeout
                )
            except (TimeoutError, httpx.TimeoutException):
                return "timeout", time.monotonic() - t0, None
            return str(r.status_code), time.monotonic() - t0, r.headers.get("retry-after")

        return await asyncio.gather(*(one(i) for i in range(n)))


def test_banner_api_sheds_load_with_503_retry_after(pg_factory: Any, tmp_path: Path) -> None:
    n, inflight, lock_s, client_timeout = 200, 16, 6.0, 5.0
    dbs = pg_factory(2)
    rows: list[tuple[str, Any]] = []
    outcomes: dict[int, list[tuple[str, float, str | None]]] = {}
    for max_inflight in (0, inflight):
        env = worker_env(
            shards=dbs.shards,
            control=dbs.control,
            bootstrap="",
            prefix="kv",
            data_dir=tmp_path / f"data{max_inflight}",
            smtp_url="",
            tokens=TOKENS,
            KVADRUPEL_API_MAX_INFLIGHT=str(max_inflight),
            KVADRUPEL_API_SERVER="uvicorn",
            KVADRUPEL_ADMIN_SESSION_SECRET="s" * 32,
        )
        env = {k: v for k, v in env.items() if v != ""}  # no broker, no SMTP: the API alone
        port = _free_port()
        api = _api(env, port, tmp_path / f"api{max_inflight}.log")
        locks = [
            psycopg.connect(u.replace("postgresql+psycopg://", "postgresql://")) for u in dbs.shards
        ]
        try:
            for conn in locks:  # every banner read now waits for the lock
                conn.execute("LOCK TABLE banner_sets, banners IN ACCESS EXCLUSIVE MODE")
            releaser = threading.Timer(lock_s, lambda held=locks: [c_.rollback() for c_ in held])
            releaser.start()
            t0 = time.monotonic()
            got = asyncio.run(_burst(port, n, client_timeout))
            wall = time.monotonic() - t0
            releaser.join()
            outcomes[max_inflight] = got
            after = asyncio.run(_burst(port, 20, 10.0))  # the lock is gone: served again
            assert {o for o, _, _ in after} == {"200"}, after
            shed = [g for g in got if g[0] == "503"]
            label = f"max_inflight={max_inflight or 'off'}"
            rows += [
                (f"{label}: requests", n),
                (f"{label}: 503 + Retry-After", sum(1 for g in shed if g[2])),
                (
                    f"{label}: gave up ({client_timeout} s)",
                    sum(1 for g in got if g[0] == "timeout"),
                ),
                (f"{label}: other", sum(1 for g in got if g[0] not in ("503", "timeout"))),
                (
                    f"{label}: 503 median / slowest (s)",
                    "{:.2f} / {:.2f}".format(
                        *(lambda w: (w[len(w) // 2], w[-1]) if w else (0, 0))(
                            sorted(g[1] for g in shed)
                        )
                    ),
                ),
                (f"{label}: burst wall (s)", f"{wall:.2f}"),
            ]
        finally:
            for conn in locks:
                conn.close()
            api.send_signal(signal.SIGTERM)
            try:
                api.wait(timeout=20)
            except subprocess.TimeoutExpired:
                api.kill()
                api.wait(timeout=10)
    text_ = table(rows, f"Kvadrupel overload: banner API (DB reads blocked {lock_s:.0f} s)")
    print("\n" + text_)
    write_summary(text_)
    off, on = outcomes[0], outcomes[inflight]
    # without shedding every request waits on the database until the client gives up
    assert sum(1 for g in off if g[0] == "timeout") >= n - inflight, text_
    # with it, all past the limit get a retryable answer before the client gives up
    shed = [g for g in on if g[0] == "503"]
    assert len(shed) >= n - inflight, text_
    assert all(g[2] for g in shed), text_  # every 503 says when to retry
