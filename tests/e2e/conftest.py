"""The pipeline wired on either setup, for end-to-end tests.

``pipeline`` is parametrised: ``embedded`` (SQLite shards, in-process bus, mail
outbox) and ``production`` (2 PostgreSQL shards + control DB, the Kafka-protocol
broker, a real SMTP server). The same test body runs on both.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from base.clock import Clock
from channels.mailers.outbox import read_outbox
from kvadrupel.container import Container
from kvadrupel.demo import install_pack
from kvadrupel.settings import Settings
from rules.pack import BUILTIN_RULES
from tests.fixtures.waiting import scaled

AS_OF = date(2026, 11, 24)
TOKENS = {"admin_token": "adm-" + "x" * 20, "ingest_token": "ing-" + "y" * 20,
          "portal_token": "por-" + "z" * 20}


@dataclass
class Pipeline:
    kind: str
    container: Container
    client: TestClient
    mails: Callable[[], list[Any]]  # every e-mail that arrived, as EmailMessage-like objects
    stop: threading.Event
    threads: list[threading.Thread] = field(default_factory=list)

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKENS[role + '_token']}"}

    def settle(self, seconds: float = 1.0) -> None:
        """Let in-flight results reach the delivery worker."""
        bus = self.container.bus
        if hasattr(bus, "join"):
            bus.join(bus.topic("jobs"), "kvadrupel-evaluate", timeout=scaled(10))
            bus.join(bus.topic("results"), "kvadrupel-deliver", timeout=scaled(10))
        else:
            time.sleep(seconds)


def _start(settings: Settings, kind: str, mails: Callable[[], list[Any]]) -> Pipeline:
    container = Container(settings, clock=Clock.pinned(AS_OF, settings.timezone))
    container.migrate()
    install_pack(container.rules, BUILTIN_RULES)
    stop = threading.Event()
    threads = [
        container.ingest_worker().start_thread(stop),
        container.evaluator_worker().start_thread(stop),
        container.delivery_worker().start_thread(stop),
    ]
    client = TestClient(create_app(container))
    return Pipeline(kind, container, client, mails, stop, threads)


@pytest.fixture(
    params=["embedded", pytest.param("production", marks=[pytest.mark.kafka, pytest.mark.postgres])]
)
def pipeline(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Pipeline]:
    if request.param == "embedded":
        settings = Settings(data_dir=tmp_path / "data", **TOKENS)
        p = _start(settings, "embedded", lambda: read_outbox(tmp_path / "data" / "outbox"))
    else:
        dbs = request.getfixturevalue("pg_factory")(2)
        broker = request.getfixturevalue("kafka_broker")
        smtp = request.getfixturevalue("smtp_server")
        settings = Settings(
            data_dir=tmp_path / "data", shards=dbs.shards, control_db=dbs.control,
            kafka_bootstrap=broker.bootstrap, kafka_topic_prefix=f"t{uuid.uuid4().hex[:8]}",
            kafka_partitions=4, kafka_session_timeout_ms=2000, kafka_heartbeat_interval_ms=500,
            kafka_fetch_wait_max_ms=20, smtp_url=smtp.url, **TOKENS,
        )
        p = _start(settings, "production", lambda: [r.message for r in smtp.messages])
    try:
        yield p
    finally:
        p.stop.set()
        for t in p.threads:
            t.join(timeout=15)
        p.client.close()
        p.container.close()
