"""A deployment for scheduler/evaluator tests, on either setup.

``make_settings(kind, request, tmp_path)``: ``embedded`` (SQLite shards and control
DB, in-process bus) or ``production`` (PostgreSQL shards + control DB from
``pg_factory``, the Tansu broker with test timings). ``load_users`` puts synthetic
profiles in the shards; ``drain_results`` reads what the evaluators published.
"""

from __future__ import annotations

import time
import uuid
from datetime import date, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from kvadrupel.container import Container
from kvadrupel.settings import Settings
from kvadrupel.synthetic import users
from tests.fixtures.waiting import scaled

AS_OF = date(2026, 11, 24)
AS_OF_MIDNIGHT = datetime(2026, 11, 24)  # clock_start: pins the container's clock to AS_OF
TOKENS = {"admin_token": "adm-" + "x" * 20, "ingest_token": "ing-" + "y" * 20,
          "portal_token": "por-" + "z" * 20}
KINDS = ["embedded", pytest.param("production", marks=[pytest.mark.kafka, pytest.mark.postgres])]


def make_settings(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, **overrides: Any
) -> Settings:
    if kind == "embedded":
        return Settings(data_dir=tmp_path / "data", **TOKENS, **overrides)
    dbs = request.getfixturevalue("pg_factory")(2)
    broker = request.getfixturevalue("kafka_broker")
    return Settings(
        data_dir=tmp_path / "data", shards=dbs.shards, control_db=dbs.control,
        kafka_bootstrap=broker.bootstrap, kafka_topic_prefix=f"t{uuid.uuid4().hex[:8]}",
        kafka_partitions=4, kafka_session_timeout_ms=2000, kafka_heartbeat_interval_ms=500,
        kafka_fetch_wait_max_ms=20, **TOKENS, **overrides,
    )


def load_users(container: Container, n: int, as_of: date = AS_OF) -> dict[int, dict[str, Any]]:
    docs: dict[int, dict[str, Any]] = dict(users(n, as_of))
    per_shard: dict[int, list[tuple[int, dict[str, Any]]]] = {}
    for uid, doc in docs.items():
        per_shard.setdefault(container.shards.router.shard_of(uid), []).append((uid, doc))
    for shard, rows in per_shard.items():
        container.shards.stores[shard].put_profiles(rows)
    return docs


def drain_results(container: Container, expect: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Every result message published so far (a fresh group reads from the start)."""
    bus = container.bus
    consumer = bus.consumer(f"{bus.prefix}-reader-{uuid.uuid4().hex[:6]}", [bus.topic("results")])
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + scaled(timeout)
    quiet_until = None
    try:
        while time.monotonic() < deadline:
            batch = consumer.poll(500, 0.2)
            got += [orjson.loads(m.value) for m in batch]
            if len(got) >= expect:
                # on, until the topic has been quiet a while, to see anything beyond what
                # was expected (a fixed half second after the first ``expect`` cut a long
                # topic short on a slow machine)
                if batch or quiet_until is None:
                    quiet_until = time.monotonic() + scaled(0.5)
                elif time.monotonic() > quiet_until:
                    break
    finally:
        consumer.close()
    return got
