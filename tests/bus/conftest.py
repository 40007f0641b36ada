"""The ``bus`` fixture: every contract test runs on the embedded bus (in memory, and
with its durable log), and on the Kafka bus."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.bus import Bus
from engine.buses.memory import MemoryBus
from tests.fixtures.kafka import PARTITIONS


@pytest.fixture(params=["memory", "durable", pytest.param("kafka", marks=pytest.mark.kafka)])
def bus(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Bus]:
    if request.param in ("memory", "durable"):
        path = tmp_path / "bus.db" if request.param == "durable" else None
        memory = MemoryBus(f"t{uuid.uuid4().hex[:12]}", partitions=PARTITIONS, path=path)
        memory.ensure_topics(memory.topics.values(), PARTITIONS)
        yield memory
        memory.close()
    else:
        # Requested lazily so that memory-only runs never start the broker.
        yield request.getfixturevalue("kafka_bus")


@pytest.fixture
def group(bus: Bus) -> str:
    """A consumer group name no other test uses (Kafka groups are broker-wide)."""
    return f"{bus.prefix}-workers"
