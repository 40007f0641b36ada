"""Metrics that only appear with real traffic: a worker's consumer lag on Kafka."""

from __future__ import annotations

import socket
import urllib.request
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.bus import Consumer
from kvadrupel.ops import serve_ops
from tests.bus.helpers import DEADLINE_S, collect
from tests.fixtures.kafka import PARTITIONS, KafkaBusFactory
from tests.fixtures.waiting import wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lag_gauges(url: str, group: str) -> dict[tuple[str, int], float]:
    """``kvadrupel_consumer_lag`` of ``group`` on the worker's ``/metrics``."""
    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback
        text = r.read().decode()
    return {(s.labels["topic"], int(s.labels["partition"])): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "kvadrupel_consumer_lag" and s.labels["group"] == group}


def wait_for_lag(consumer: Consumer, url: str, group: str,
                 expected: dict[tuple[str, int], float]) -> None:
    """Poll (statistics are handed over inside poll) until /metrics shows ``expected``."""
    if lag_gauges(url, group) == expected:
        return

    def polled() -> dict[tuple[str, int], float]:
        assert consumer.poll(timeout=0.05) == []
        return lag_gauges(url, group)

    wait_for(polled, f"/metrics to show the lag {expected}", until=lambda seen: seen == expected,
             timeout=DEADLINE_S, every=0)


@pytest.mark.kafka
def test_consumer_lag_per_partition_appears_in_metrics(kafka_bus_factory: KafkaBusFactory) -> None:
    # Given a worker's ops endpoint and a bus whose consumers report lag every 100 ms
    bus = kafka_bus_factory(lag_interval_ms=100)
    topic = bus.topic("events")
    bus.ensure_topics([topic], PARTITIONS)
    server = serve_ops(None, free_port(), host="127.0.0.1")
    assert server is not None
    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    group = f"{bus.prefix}-ingest"
    try:
        # And 60 messages published over the partitions
        for i in range(60):
            bus.publish(topic, b"e%d" % i, key=b"user-%d" % i)
        bus.flush()
        per_partition = Counter(bus.partition_of(topic, b"user-%d" % i) for i in range(60))

        with bus.consumer(group, [topic]) as consumer:
            # When the worker reads them all, nothing committed yet (a new group)
            (got,) = collect([consumer], 60, commit=False)

            # Then /metrics shows every message of each partition as lag
            wait_for_lag(consumer, url, group,
                         {(topic, p): float(n) for p, n in per_partition.items()})

            # And once it committed each partition's first 5, the rest
            consumer.commit([m for m in got if m.offset < 5])
            expected = {(topic, p): float(max(0, n - 5)) for p, n in per_partition.items()}
            wait_for_lag(consumer, url, group, expected)

            # And after committing the rest, 0
            consumer.commit(got)
            wait_for_lag(consumer, url, group, {k: 0.0 for k in expected})

        # And a member that left reports nothing any more (the next owner does)
        assert lag_gauges(url, group) == {}
    finally:
        server.shutdown()
        server.server_close()
