"""A shard database down for a while, and the worker cut off from the broker for a
while: the worker stops pulling (bounded memory), resumes by itself, and in the
end every profile is the one-by-one result and the DLQ holds exactly the bad
messages."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from engine.buses.kafka import KafkaBus
from engine.ingest.worker import IngestWorker
from shards.router import ShardRouter
from shards.shardset import ShardSet, open_shard
from tests.faults import ingestkit as kit
from tests.faults import pgcontrol
from tests.fixtures.kafka import TEST_TIMINGS, TansuBroker, _wait_ready, tansu_binary
from tests.fixtures.waiting import scaled, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]
BATCH = 50
PIPELINE = 2


class Running:
    """An in-process ingest worker thread, watched: the most messages it ever held
    (in flight or kept for a retry) and whether it paused."""

    def __init__(self, worker: IngestWorker) -> None:
        self.worker = worker
        self.stop = threading.Event()
        self.max_held = 0
        self.paused_seen = False
        self.thread = worker.start_thread(self.stop)
        self._watch = threading.Thread(target=self._watcher, daemon=True)
        self._watch.start()

    def _watcher(self) -> None:
        while not self.stop.is_set():
            w = self.worker
            held = len(w._batch or ()) + sum(len(b.messages) for b in list(w._inflight))
            self.max_held = max(self.max_held, held)
            self.paused_seen |= w.paused
            time.sleep(0.005)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self._watch.join(5)


def committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "group.protocol": "classic"})
    try:
        parts = c.committed([TopicPartition(topic, p) for p in range(4)], timeout=10)
        return {tp.partition: tp.offset for tp in parts}
    finally:
        c.close()


def check(stream: kit.Stream, shard_urls: list[str], dlq: list) -> None:
    expected, bad = stream.expected()
    stored = kit.stored_profiles(shard_urls)
    assert set(stored) <= set(expected)
    assert [u for u in expected if stored.get(u, {}) != expected[u]] == []
    assert bad and set(kit.iter_dlq_sources(dlq)) == bad


def make_worker(bus: KafkaBus, shard_urls: list[str]) -> tuple[IngestWorker, ShardSet]:
    shards = ShardSet(
        ShardRouter.uniform(len(shard_urls)), [open_shard(i, u) for i, u in enumerate(shard_urls)]
    )
    worker = IngestWorker(
        bus.consumer(f"{bus.prefix}-ingest", [bus.topic("events")]),
        bus,
        shards,
        max_bytes=kit.MAX_BYTES,
        batch_max=BATCH,
        batch_ms=10,
        pipeline=PIPELINE,
        seen_cap=kit.DEDUPE_IDS,
        cache_users=1000,
    )
    worker.max_backoff = 0.5
    return worker, shards


def test_a_shard_database_down_for_a_while(kafka_broker: TansuBroker, pg_factory) -> None:  # noqa: ANN001
    urls = pg_factory(2).shards
    bus = KafkaBus(kafka_broker.bootstrap, f"t{uuid.uuid4().hex[:10]}", **TEST_TIMINGS)
    bus.ensure_topics(bus.topics.values(), 4)
    stream = kit.Stream(kafka_broker.bootstrap, bus.topic("events"), users=40, seed=11)
    worker, shards = make_worker(bus, urls)
    run = Running(worker)
    try:
        # Given a steady stream being ingested
        producer = stream.publish_in_background(4000, rate=1000)
        time.sleep(1.0)
        # When shard 1's database goes away for 3 s
        pgcontrol.down(urls[1])
        wait_for(lambda: worker.paused, "the worker to pause", timeout=5, every=0.1)
        at_pause = committed(kafka_broker.bootstrap, f"{bus.prefix}-ingest", bus.topic("events"))
        time.sleep(3.0)
        # Then it stopped pulling: no offset moved, and it holds at most the
        # batches that were in flight (plus one poll)
        assert worker.paused
        assert (
            committed(kafka_broker.bootstrap, f"{bus.prefix}-ingest", bus.topic("events"))
            == at_pause
        )
        pgcontrol.up(urls[1])
        # ...and once the database is back it resumes by itself and catches up
        producer.join(scaled(30))
        wait_for(lambda: kit.marks_behind(urls, stream.topic, stream.last_offsets()),
                 "every event applied (partitions behind: offset mark/last offset)",
                 until=lambda behind: not behind, timeout=30, every=0.1)
        wait_for(lambda: worker.paused, "the worker to resume (paused?)",
                 until=lambda paused: not paused, timeout=5, every=0.1)
    finally:
        pgcontrol.up(urls[1])
        run.close()
        shards.close()
        bus.close()
        stream.close()
    assert run.paused_seen and run.max_held <= (PIPELINE + 1) * BATCH
    check(stream, urls, kit.read_topic(kafka_broker.bootstrap, f"{bus.prefix}.events.dlq"))


@pytest.fixture
def proxied_broker(tmp_path: Path) -> Iterator[tuple[str, kit.TcpProxy]]:
    """A Tansu broker that advertises the proxy's address: every client (the
    worker, the producer, the readers) reaches it only through the proxy."""
    port, proxy_port = kit.free_port(), kit.free_port()
    proxy = kit.TcpProxy(proxy_port, ("127.0.0.1", port))
    cluster = f"test-{uuid.uuid4()}"
    log = (tmp_path / "tansu.log").open("wb")
    proc = subprocess.Popen(
        [
            str(tansu_binary()),
            "broker",
            "--cluster-id",
            cluster,
            "--listener-url",
            f"tcp://127.0.0.1:{port}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{proxy_port}",
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    broker = TansuBroker(f"127.0.0.1:{proxy_port}", cluster, proc, tmp_path / "tansu.log", log)
    try:
        _wait_ready(broker, 15)
        yield broker.bootstrap, proxy
    finally:
        proxy.close()
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        log.close()


def test_the_worker_cut_off_from_the_broker_for_a_while(proxied_broker, pg_factory) -> None:  # noqa: ANN001
    bootstrap, proxy = proxied_broker
    urls = pg_factory(2).shards
    bus = KafkaBus(bootstrap, f"t{uuid.uuid4().hex[:10]}", **TEST_TIMINGS)
    bus.ensure_topics(bus.topics.values(), 4)
    stream = kit.Stream(bootstrap, bus.topic("events"), users=40, seed=13)
    worker, shards = make_worker(bus, urls)
    run = Running(worker)
    try:
        # Given a stream being ingested (the producer goes through the proxy too)
        producer = stream.publish_in_background(3000, rate=800)
        wait_for(lambda: worker.handled, "the worker to start (events handled)",
                 until=lambda handled: handled > 200, timeout=15, every=0.1)
        # When the network to the broker is cut for 4 s, mid-stream (longer than
        # the 2 s session timeout: the group drops the member)
        proxy.cut()
        time.sleep(4.0)
        held_during_cut = run.max_held
        proxy.restore()
        # Then it rejoins by itself and finishes: every event applied once
        producer.join(scaled(60))
        wait_for(lambda: kit.marks_behind(urls, stream.topic, stream.last_offsets()),
                 "every event applied (partitions behind: offset mark/last offset)",
                 until=lambda behind: not behind, timeout=40, every=0.1)
        assert worker.failures > 0 and run.paused_seen  # it did notice the cut
    finally:
        run.close()
        shards.close()
        bus.close()
        stream.close()
    assert held_during_cut <= (PIPELINE + 1) * BATCH
    check(stream, urls, kit.read_topic(bootstrap, f"{bus.prefix}.events.dlq"))
