"""The ``bus`` fixture: every contract test runs on the embedded and the Kafka bus."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from engine.bus import Bus
from engine.buses.memory import MemoryBus
from tests.fixtures.kafka import PARTITIONS


@pytest.fixture(params=["memory", pytest.param("kafka", marks=pytest.mark.kafka)])
def bus(request: pytest.FixtureRequest) -> Iterator[Bus]:
    if request.param == "memory":
        memory = MemoryBus(f"t{uuid.uuid4().hex[:12]}", partitions=PARTITIONS)
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
