"""Produce and consume throughput of KafkaBus on a local Tansu broker.

    .venv/bin/python bench/bench_bus.py [--messages 200000] [--compression lz4 none]

Starts Tansu the way the test fixture does (memory storage, loopback), publishes
small keyed messages through KafkaBus (idempotent, acks=all) and reads them back
with one group member that commits every batch, as a worker would. The consumer
rate is timed from its first message (group join excluded, reported separately).
Not a test; figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.buses.kafka import KafkaBus  # noqa: E402
from tests.fixtures.kafka import TEST_TIMINGS, start_tansu  # noqa: E402


def run(bootstrap: str, n: int, compression: str, partitions: int) -> dict[str, float]:
    bus = KafkaBus(
        bootstrap,
        f"bench{uuid.uuid4().hex[:8]}",
        # Group join on Tansu takes session.timeout.ms/2: keep the test value so the
        # join does not dominate; fetch.wait.max.ms keeps its production default.
        session_timeout_ms=TEST_TIMINGS["session_timeout_ms"],
        heartbeat_interval_ms=TEST_TIMINGS["heartbeat_interval_ms"],
        extra={"producer.compression.type": compression},
    )
    topic = bus.topic("events")
    bus.ensure_topics([topic], partitions)
    # ~80-byte JSON-ish payloads over 10k users, like ingest events.
    payloads = [
        (f'{{"user":{i % 10_000},"type":"page_view","seq":{i},"ts":1700000000}}'.encode(),
         str(i % 10_000).encode())
        for i in range(n)
    ]
    try:
        # Producer: first message (idempotent producer id) outside the timing.
        bus.publish(topic, b"warm-up", key=b"warm-up")
        bus.flush()
        t0 = time.perf_counter()
        for value, key in payloads:
            bus.publish(topic, value, key=key)
        bus.flush()
        produce_s = time.perf_counter() - t0

        total = n + 1
        consumer = bus.consumer(f"{bus.prefix}-bench", [topic])
        t_join = time.perf_counter()
        got = 0
        t_first = None
        deadline = time.monotonic() + 300
        while got < total:
            batch = consumer.poll(max_messages=1000, timeout=0.5)
            if batch:
                if t_first is None:
                    t_first = time.perf_counter()
                got += len(batch)
                consumer.commit(batch)
            if time.monotonic() > deadline:
                raise SystemExit(f"consumed only {got} of {total}")
        t_end = time.perf_counter()
        consumer.close()
    finally:
        bus.close(timeout=10)
    assert t_first is not None
    return {
        "produce_per_s": n / produce_s,
        "consume_per_s": (total - 1) / (t_end - t_first),  # first batch starts the clock
        "join_s": t_first - t_join,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--compression", nargs="+", default=["lz4", "none"])
    args = parser.parse_args()

    broker = start_tansu()
    try:
        print(f"tansu {broker.bootstrap}: {args.messages} messages, {args.partitions} partitions")
        for compression in args.compression:
            r = run(broker.bootstrap, args.messages, compression, args.partitions)
            print(
                f"compression={compression:5}  produce {r['produce_per_s']:>9,.0f} msg/s   "
                f"consume+commit {r['consume_per_s']:>9,.0f} msg/s   "
                f"(group join {r['join_s']:.1f} s)"
            )
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
