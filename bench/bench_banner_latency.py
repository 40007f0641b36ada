"""Event → banner visible through the REST API: p50/p99 latency under ingest load.

    flock /tmp/kvadrupel-bench.lock .venv/bin/python bench/bench_banner_latency.py \
        [--load 2000] [--probes 200] [--users 50000]

The production setup on one machine, every part a real process: a Tansu
broker, 2 PostgreSQL shards + control DB, ``kvadrupel ingest``, ``evaluate``,
``deliver`` and ``api``, the built-in rule pack. A background producer keeps
``--load`` events/s flowing to Kafka for ``--users`` other users (each one is
ingested and re-evaluated, as in production). Meanwhile a probe POSTs, through
the REST API, an event that makes the ``dl-expiring`` rule match a fresh user
(licence expiring in 20 days) and polls ``GET /v1/users/{id}/banners`` every
5 ms until the banner is there. Latency = from sending the POST to the first
response that shows the banner. Probes are 100 ms apart.
Not a test; figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import date, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import orjson  # noqa: E402
from confluent_kafka import Producer  # noqa: E402

from bench.ingest_common import create_databases, drop_databases, event, user_ids  # noqa: E402
from engine.buses.kafka import KafkaBus  # noqa: E402
from tests.fixtures.kafka import TEST_TIMINGS, start_tansu  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOKENS = {
    "KVADRUPEL_ADMIN_TOKEN": "adm-" + "x" * 20,
    "KVADRUPEL_INGEST_TOKEN": "ing-" + "y" * 20,
    "KVADRUPEL_PORTAL_TOKEN": "por-" + "z" * 20,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def background_load(
    bootstrap: str, topic: str, rate: float, n_users: int, stop: threading.Event, sent: list[int]
) -> None:
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "partitioner": "murmur2_random",
        }
    )
    rng = random.Random(3)
    ids = user_ids(n_users)
    t0 = time.monotonic()
    i = 0
    while not stop.is_set():
        uid = ids[rng.randrange(n_users)]
        producer.produce(topic, orjson.dumps(event(i, uid, rng)), str(uid).encode())
        producer.poll(0)
        i += 1
        ahead = t0 + i / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    producer.flush(30)
    sent.append(i)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--load", type=float, default=2000, help="background events/s")
    ap.add_argument("--probes", type=int, default=200)
    ap.add_argument("--users", type=int, default=50_000)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    broker = start_tansu(tmp)
    prefix = f"lat{uuid.uuid4().hex[:8]}"
    shards = create_databases("shard", 2)
    [control] = create_databases("control", 1)
    port = free_port()
    env = {
        **os.environ,
        **TOKENS,
        "KVADRUPEL_SHARDS": ",".join(shards),
        "KVADRUPEL_CONTROL_DB": control,
        "KVADRUPEL_KAFKA_BOOTSTRAP": broker.bootstrap,
        "KVADRUPEL_KAFKA_TOPIC_PREFIX": prefix,
        "KVADRUPEL_KAFKA_PARTITIONS": "8",
        "KVADRUPEL_KAFKA_SESSION_TIMEOUT_MS": str(TEST_TIMINGS["session_timeout_ms"]),
        "KVADRUPEL_KAFKA_HEARTBEAT_INTERVAL_MS": str(TEST_TIMINGS["heartbeat_interval_ms"]),
        # A waiting fetch is answered after ~half of this on Tansu (see KAFKA-TESTING.md).
        "KVADRUPEL_KAFKA_FETCH_WAIT_MAX_MS": "20",
        "KVADRUPEL_LOG_LEVEL": "WARNING",
        "KVADRUPEL_API_WORKERS": "1",
    }
    procs: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()
    try:
        bus = KafkaBus(broker.bootstrap, prefix)
        bus.ensure_topics(bus.topics.values(), 8)
        bus.close()
        py = sys.executable
        # The rule pack goes in through the same code the demo uses; the bucket map
        # is written now (processes starting together would race to create it).
        subprocess.run(
            [
                py,
                "-c",
                "from kvadrupel.container import Container; from kvadrupel.settings import "
                "Settings; from kvadrupel.demo import install_pack; from rules.pack import "
                "BUILTIN_RULES; "
                "c = Container(Settings()); install_pack(c.rules, BUILTIN_RULES); c.shards; "
                "c.close()",
            ],
            env=env,
            cwd=ROOT,
            check=True,
        )
        for cmd in (
            ["ingest"],
            ["evaluate"],
            ["deliver"],
            ["api", "--host", "127.0.0.1", "--port", str(port)],
        ):
            log = (tmp / f"{cmd[0]}.log").open("wb")
            procs.append(
                subprocess.Popen(
                    [py, "-m", "kvadrupel.cli", *cmd],
                    env=env,
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.get("/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("API did not start:\n" + (tmp / "api.log").read_text()[-3000:])
            time.sleep(0.2)
        sent: list[int] = []
        load = threading.Thread(
            target=background_load,
            args=(broker.bootstrap, f"{prefix}.events", args.load, args.users, stop, sent),
        )
        load.start()
        time.sleep(5)  # workers joined their groups and the load is flowing

        ingest_h = {"Authorization": f"Bearer {TOKENS['KVADRUPEL_INGEST_TOKEN']}"}
        portal_h = {"Authorization": f"Bearer {TOKENS['KVADRUPEL_PORTAL_TOKEN']}"}
        expires = (date.today() + timedelta(days=20)).isoformat()
        lat: list[float] = []
        missed = 0
        t_probes = time.monotonic()
        for k in range(args.probes):
            uid = 9_000_000_000 + k
            t0 = time.perf_counter()
            r = client.post(
                "/v1/events",
                headers=ingest_h,
                json={
                    "event_id": f"probe-{k}",
                    "user_id": uid,
                    "set": {
                        "email": f"p{k}@example.org",
                        "birth_date": "1980-03-03",
                        "driver_license": {"expires_on": expires},
                    },
                },
            )
            assert r.status_code == 202, r.text
            while True:
                b = client.get(f"/v1/users/{uid}/banners", headers=portal_h)
                if b.status_code == 200 and any(
                    x["rule"] == "dl-expiring" for x in b.json()["banners"]
                ):
                    lat.append(time.perf_counter() - t0)
                    break
                if time.perf_counter() - t0 > 10:
                    missed += 1
                    break
                time.sleep(0.005)
            if k % 50 == 49:
                print(f"  {k + 1} probes, median so far {statistics.median(lat) * 1000:.0f} ms",
                      flush=True)
            time.sleep(max(0.0, 0.1 - (time.perf_counter() - t0)))
        probe_s = time.monotonic() - t_probes
        stop.set()
        load.join(60)
        lat.sort()
        if len(lat) < 2:
            raise SystemExit(f"only {len(lat)} probe(s) seen; logs in {tmp}")
        q = statistics.quantiles(lat, n=100, method="inclusive")
        print(
            f"event → banner via REST, {len(lat)} probes over {probe_s:.0f}s, background load "
            f"{args.load:,.0f} events/s to Kafka over {args.users:,} users ({sent[0]:,} sent)"
        )
        print(
            f"  p50 {q[49] * 1000:6.0f} ms   p90 {q[89] * 1000:6.0f} ms   p99 {q[98] * 1000:6.0f} "
            "ms   "
            f"max {lat[-1] * 1000:6.0f} ms   (not seen within 10 s: {missed})"
        )
        print(f"  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    finally:
        stop.set()
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        broker.stop()
        drop_databases(shards + [control])


if __name__ == "__main__":
    main()
