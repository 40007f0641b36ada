"""Delivery under faults, on PostgreSQL + the Kafka-protocol broker + aiosmtpd:

* the SMTP server goes down and comes back: every message is delivered exactly once;
* ``kill -9`` of a real ``kvadrupel deliver`` process while it sends (and
  while some addresses are refused): every episode's e-mail arrives, never two
  different messages for one episode; a repeat can only be the same message (same
  Message-ID, for the receiver to drop) from the one chunk in flight at the kill.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import func, select

from channels.ledger import Ledger
from channels.mailers.smtp import SmtpMailer
from kvadrupel.container import Container
from shards.schema import ledger as ledger_table
from tests.channels.deliverykit import MAIL_FROM, TOKENS, enter, pg_settings
from tests.channels.deliverykit import make_worker as make_delivery_worker
from tests.fixtures.waiting import scaled, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]
ROOT = Path(__file__).resolve().parents[2]


def _publish(bus: Any, results: list[dict[str, Any]]) -> None:
    topic = bus.topic("results")
    for r in results:
        bus.publish(topic, orjson.dumps(r), key=str(r["user_id"]).encode())
    bus.flush()


def _statuses(container: Container) -> Counter[str]:
    with container.control.connect() as conn:
        return Counter({s: n for s, n in conn.execute(
            select(ledger_table.c.status, func.count()).group_by(ledger_table.c.status))})


def test_smtp_down_then_up_every_message_exactly_once(tmp_path: Path, pg_factory: Any,
                                                      kafka_bus: Any, smtp_server: Any) -> None:
    n = 60
    container = Container(pg_settings(tmp_path, pg_factory(2), smtp_url=smtp_server.url),
                          bus_override=kafka_bus)
    container.migrate()
    ledger = Ledger(container.control, max_attempts=50, base_delay_s=0.05, max_delay_s=0.5)
    worker = make_delivery_worker(
        container, ledger, SmtpMailer(smtp_server.url, MAIL_FROM, timeout=5), ledger.clock
    )
    worker.chore_interval_s = 0.05
    stop = threading.Event()
    thread = worker.start_thread(stop)
    try:
        smtp_server.stop()
        _publish(kafka_bus, [enter(5_000_000 + i, "r1", 1) for i in range(n)])
        wait_for(lambda: (_statuses(container),
                          [e["attempts"] for e in ledger.entries(5_000_000)]),
                 "every message claimed and retried while the server is down "
                 "(ledger by status, attempts of user 5000000)",
                 until=lambda v: v[0]["pending"] == n and min(v[1]) >= 2, timeout=20, every=0.1)
        smtp_server.start()
        wait_for(lambda: _statuses(container), f"all {n} messages sent (ledger by status)",
                 until=lambda st: st["sent"] == n, timeout=20, every=0.1)
        time.sleep(0.3)  # nothing more may arrive
        ids = [str(r.message["Message-ID"]) for r in smtp_server.messages]
        assert len(ids) == n
        assert sorted(ids) == sorted(f"<{5_000_000 + i}.r1.1@kvadrupel>" for i in range(n))
    finally:
        stop.set()
        thread.join(timeout=15)
        container.close()


def _deliver(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # noqa: S603 - our own CLI
        [sys.executable, "-m", "kvadrupel.cli", "deliver"], cwd=ROOT, env=env,
        stdout=log.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def test_kill_9_of_the_delivery_worker_never_sends_two_messages_for_one_episode(
    tmp_path: Path, pg_factory: Any, kafka_broker: Any, kafka_bus: Any, smtp_server: Any
) -> None:
    n, chunk = 400, 50
    dbs = pg_factory(2)
    container = Container(
        pg_settings(tmp_path, dbs, smtp_url=smtp_server.url), bus_override=kafka_bus
    )
    container.migrate()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "KVADRUPEL_DATA_DIR": str(tmp_path / "data"),
        "KVADRUPEL_SHARDS": ",".join(dbs.shards),
        "KVADRUPEL_CONTROL_DB": dbs.control,
        "KVADRUPEL_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
        "KVADRUPEL_KAFKA_TOPIC_PREFIX": kafka_bus.prefix,
        "KVADRUPEL_KAFKA_PARTITIONS": "4",
        "KVADRUPEL_KAFKA_SESSION_TIMEOUT_MS": "2000",
        "KVADRUPEL_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
        "KVADRUPEL_KAFKA_FETCH_WAIT_MAX_MS": "20",
        "KVADRUPEL_SMTP_URL": smtp_server.url,
        "KVADRUPEL_SMTP_CONCURRENCY": "4",
        "KVADRUPEL_DELIVERY_CLAIM_TIMEOUT_S": "2",
        "KVADRUPEL_DELIVERY_RETRY_BASE_S": "0.2",
        "KVADRUPEL_DELIVERY_RETRY_MAX_S": "1",
        "KVADRUPEL_DELIVERY_MAX_ATTEMPTS": "50",
        "KVADRUPEL_DELIVERY_SEND_CHUNK": str(chunk),
        "KVADRUPEL_LOG_LEVEL": "WARNING",
        "KVADRUPEL_ADMIN_TOKEN": TOKENS["admin_token"],
    }
    log = tmp_path / "deliver.log"
    refused = {f"user{5_100_000 + i}@example.org" for i in range(0, n, 10)}
    smtp_server.refuse(451, addresses=refused)  # some retries across the kills
    _publish(kafka_bus, [enter(5_100_000 + i, "r1", 1) for i in range(n)])

    procs = []
    try:
        for until in (150,):
            proc = _deliver(env, log)
            procs.append(proc)
            wait_for(lambda: len(smtp_server.messages), f"{until} messages received",
                     until=lambda got, u=until: got >= u, timeout=30, every=0.1)
            os.kill(proc.pid, signal.SIGKILL)  # mid-send: no chance to record or commit
            proc.wait(timeout=10)
        smtp_server.accept()
        proc = _deliver(env, log)
        procs.append(proc)
        wait_for(lambda: _statuses(container), "every episode's e-mail sent (ledger by status)",
                 until=lambda st: st["sent"] == n, timeout=40, every=0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=scaled(20)) == 0, log.read_text()[-3000:]
        with container.control.connect() as conn:
            attempts = dict(
                conn.execute(
                    select(ledger_table.c.status, func.max(ledger_table.c.attempts)).group_by(
                        ledger_table.c.status
                    )
                ).all()
            )
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        container.close()

    got = Counter(str(r.message["Message-ID"]) for r in smtp_server.messages)
    expected = {f"<{5_100_000 + i}.r1.1@kvadrupel>" for i in range(n)}
    assert set(got) == expected  # every episode, and nothing but them
    for r in smtp_server.messages:  # one identity per episode: the Message-ID matches its recipient
        uid = str(r.message["Message-ID"])[1:].split(".")[0]
        assert r.rcpt_tos == (f"user{uid}@example.org",)
    repeats = sum(got.values()) - n
    print(f"kill -9: {n} episodes, {sum(got.values())} messages received, {repeats} repeats")
    assert repeats <= chunk, got.most_common(3)  # only the chunk in flight at the kill
    assert set(attempts) == {"sent"} and attempts["sent"] >= 2  # the refused ones were retried
