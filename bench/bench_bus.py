"""Produce and consume throughput of the buses: KafkaBus on a local Tansu broker, and
the embedded MemoryBus in memory and with its durable log (SQLite, WAL).

    .venv/bin/python bench/bench_bus.py [--bus kafka embedded] [--messages 200000]
                                        [--compression lz4 none]

Kafka: starts Tansu the way the test fixture does (memory storage, loopback),
publishes small keyed messages through KafkaBus (idempotent, acks=all) and reads
them back with one group member that commits every batch, as a worker would. The
consumer rate is timed from its first message (group join excluded, reported
separately).

Embedded: the same messages through MemoryBus without a log, and with the durable
log at synchronous=NORMAL and FULL (the default: an fsync per flush group), flushed
every 1 / 100 / 5,000 messages from one thread, and every 100 messages from 8
threads at once (concurrent REST requests); then consumed with a commit per batch
of 1,000 (the commit also trims the log). The log lives in a temporary directory on
the same file system as the repository (``--dir`` to choose).
Not a test; figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.buses.kafka import KafkaBus  # noqa: E402
from engine.buses.memory import MemoryBus  # noqa: E402
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


def payloads_for(n: int) -> list[tuple[bytes, bytes]]:
    return [(f'{{"user":{i % 10_000},"type":"page_view","seq":{i},"ts":1700000000}}'.encode(),
             str(i % 10_000).encode()) for i in range(n)]


def embedded(n: int, partitions: int, group: int, threads: int, sync: str | None,
             base: Path) -> dict[str, float]:
    """Publish ``n`` messages flushing every ``group`` (from ``threads`` threads), then
    consume them all committing every batch; msg/s of each side."""
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        path = Path(tmp) / "bus.db" if sync else None
        bus = MemoryBus("bench", partitions=partitions, path=path, synchronous=sync or "FULL")
        topic = bus.topic("events")
        bus.ensure_topics([topic], partitions)
        bus.publish(topic, b"warm-up", key=b"warm-up")  # opens the log outside the timing
        bus.flush()
        payloads = payloads_for(n)
        share = n // threads

        def produce(part: list[tuple[bytes, bytes]]) -> None:
            for i in range(0, len(part), group):
                for value, key in part[i : i + group]:
                    bus.publish(topic, value, key=key)
                bus.flush()

        t0 = time.perf_counter()
        workers = [threading.Thread(target=produce, args=(payloads[k * share : (k + 1) * share],))
                   for k in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        produce_s = time.perf_counter() - t0
        total = share * threads + 1
        consumer = bus.consumer("bench-group", [topic])
        got, t1 = 0, time.perf_counter()
        while got < total:
            batch = consumer.poll(max_messages=1000, timeout=0.5)
            got += len(batch)
            consumer.commit(batch)
        consume_s = time.perf_counter() - t1
        consumer.close()
        bus.close()
    return {"produce_per_s": share * threads / produce_s, "consume_per_s": total / consume_s}


def rest_path(n: int, partitions: int, clients: int, sync: str | None, base: Path) -> float:
    """Events/s through the REST publisher (engine.ingest.publisher.GroupPublisher: one
    thread publishes and flushes the requests of ``clients`` concurrent callers in
    groups), 100 events per request: the part of POST /v1/events after validation."""
    from engine.ingest.publisher import GroupPublisher

    with tempfile.TemporaryDirectory(dir=base) as tmp:
        path = Path(tmp) / "bus.db" if sync else None
        bus = MemoryBus("bench", partitions=partitions, path=path, synchronous=sync or "FULL")
        topic = bus.topic("events")
        bus.ensure_topics([topic], partitions)
        publisher = GroupPublisher(bus, topic)
        publisher.submit([(b"warm-up", b"0")]).result()
        requests = [payloads_for(100) for _ in range(n // 100 // clients)]

        def client() -> None:
            for body in requests:
                publisher.submit(body).result()

        t0 = time.perf_counter()
        workers = [threading.Thread(target=client) for _ in range(clients)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - t0
        publisher.close()
        bus.close()
    return len(requests) * 100 * clients / elapsed


def run_embedded(n: int, partitions: int, base: Path) -> None:
    print(f"embedded MemoryBus: {n} messages, {partitions} partitions, log under {base}")
    print(f"{'log':<16} {'flush every':>16} {'publish msg/s':>14} {'consume+commit msg/s':>21}")
    for sync in (None, "NORMAL", "FULL"):
        for group, threads in ((1, 1), (100, 1), (5000, 1), (100, 8)):
            # One fsync per message is slow: fewer messages, same rate.
            count = min(n, 2000) if group == 1 and sync else n
            r = embedded(count, partitions, group, threads, sync, base)
            label = f"{group} x {threads} thr" if threads > 1 else f"{group}"
            print(f"{(sync or 'none (memory)'):<16} {label:>16} {r['produce_per_s']:>14,.0f} "
                  f"{r['consume_per_s']:>21,.0f}", flush=True)
    print(f"\nREST publisher (GroupPublisher), requests of 100 events, {n} events")
    print(f"{'log':<16} {'clients':>8} {'events/s':>10}")
    for sync in (None, "FULL"):
        for clients in (1, 16):
            rate = rest_path(n, partitions, clients, sync, base)
            print(f"{(sync or 'none (memory)'):<16} {clients:>8} {rate:>10,.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--compression", nargs="+", default=["lz4", "none"])
    parser.add_argument("--bus", nargs="+", choices=["kafka", "embedded"],
                        default=["kafka", "embedded"])
    parser.add_argument("--dir", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="where the embedded log's temporary directory goes")
    args = parser.parse_args()

    if "embedded" in args.bus:
        run_embedded(args.messages, args.partitions, args.dir)
    if "kafka" not in args.bus:
        return
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
