"""kill -9 a real ``kvadrupel ingest`` process mid-stream, several times, and restart it:
nothing lost, nothing counted twice, and the DLQ holds exactly the bad messages."""

from __future__ import annotations

import random
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from engine.buses.kafka import KafkaBus
from tests.faults import ingestkit as kit
from tests.fixtures.kafka import TEST_TIMINGS, TansuBroker
from tests.fixtures.waiting import scaled, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


def progress(shard_urls: list[str], topic: str) -> int:
    """How many offsets the shards have committed, summed over partitions."""
    best: dict[int, int] = {}
    for url in shard_urls:
        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
            for p, off in conn.execute(
                'SELECT partition, "offset" FROM ingest_marks WHERE topic = %s', (topic,)
            ):
                best[p] = max(best.get(p, -1), off)
    return sum(o + 1 for o in best.values())


def test_kill_9_mid_stream_and_restart(
    kafka_broker: TansuBroker, pg_factory, tmp_path: Path
) -> None:  # noqa: ANN001
    dbs = pg_factory(2)
    prefix = f"t{uuid.uuid4().hex[:10]}"
    bus = KafkaBus(kafka_broker.bootstrap, prefix, **TEST_TIMINGS)
    bus.ensure_topics(bus.topics.values(), 4)
    bus.close()
    stream = kit.Stream(kafka_broker.bootstrap, f"{prefix}.events", users=60, seed=3)
    # Small batches: a kill lands between a shard commit and the offset commit often.
    env = kit.worker_env(
        dbs.shards,
        dbs.control,
        kafka_broker.bootstrap,
        prefix,
        KVADRUPEL_INGEST_BATCH_MAX="40",
        KVADRUPEL_INGEST_BATCH_MS="10",
    )
    log = tmp_path / "worker.log"
    rng = random.Random(5)

    # Given a producer that keeps publishing (~7 s)
    producer = stream.publish_in_background(9000, rate=1300)
    # When the worker is killed -9 three times, each time soon after it made progress
    seen = []
    for _ in range(3):
        worker = kit.start_worker(env, log)
        before = progress(dbs.shards, stream.topic)
        wait_for(
            lambda: progress(dbs.shards, stream.topic),
            f"the worker to make progress past {before}\n{log.read_text()[-2000:]}",
            until=lambda now, b=before: now > b,
            timeout=30,
            every=0.02,
        )
        time.sleep(rng.uniform(0.05, 0.6))
        worker.kill()
        worker.wait(10)
        seen.append(progress(dbs.shards, stream.topic))
    producer.join(scaled(30))
    # Progress between kills. (Whether events are still left for the final restart
    # depends on timing: a fast worker may have caught up with the producer by the
    # third kill, which is fine — the restart must then find nothing to redo.)
    assert seen == sorted(seen) and seen[0] < 9000
    # ...and restarted once more
    worker = kit.start_worker(env, log)
    try:
        wait_for(
            lambda: kit.marks_behind(dbs.shards, stream.topic, stream.last_offsets()),
            "every event applied (partitions behind: offset mark/last offset)"
            f"\n{log.read_text()[-2000:]}",
            until=lambda behind: not behind,
            timeout=40,
            every=0.1,
        )
        dlq = kit.read_topic(kafka_broker.bootstrap, f"{prefix}.events.dlq")
    finally:
        worker.terminate()
        worker.wait(15)
        stream.close()

    # Then every profile is the one-by-one result of its events...
    expected, bad = stream.expected()
    stored = kit.stored_profiles(dbs.shards)
    assert set(stored) <= set(expected)
    mismatched = [u for u in expected if stored.get(u, {}) != expected[u]]
    assert not mismatched, (
        mismatched[:3],
        [stored.get(u) for u in mismatched[:1]],
        [expected[u] for u in mismatched[:1]],
    )
    # ...and the DLQ holds exactly the bad messages (a kill between publishing a
    # dead letter and committing may repeat one: same source, same cause)
    assert bad and set(kit.iter_dlq_sources(dlq)) == bad
    by_source: dict = {}
    for record in dlq:
        src = (record["source"]["partition"], record["source"]["offset"])
        assert record["cause"] and by_source.setdefault(src, record["cause"]) == record["cause"]
