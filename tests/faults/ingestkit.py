"""Helpers for the ingest fault tests: a recorded event stream with its oracle,
"everything applied" detection from the shards' marks, the DLQ reader, a real
``kvadrupel ingest`` subprocess, and a TCP proxy that can cut a client off."""

from __future__ import annotations

import os
import random
import selectors
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
from confluent_kafka import Consumer, Producer

from base.errors import EventError
from engine.messages.event import parse_event
from tests.engine.test_events import oracle
from tests.fixtures.waiting import scaled, wait_for

ROOT = Path(__file__).resolve().parents[2]
MAX_BYTES = 2048  # small profile limit: some events fail on size
# The workers' duplicate window (KVADRUPEL_INGEST_DEDUPE_IDS). 1, not the default
# 64: replays after a crash must then be absorbed by the offset marks alone (the
# id window would otherwise hide a fault in them); the oracle uses the same window.
DEDUPE_IDS = 1


class Stream:
    """Events for ``users`` users, published keyed by user id; remembers what
    went to which partition at which offset, to compute what must be stored."""

    def __init__(self, bootstrap: str, topic: str, users: int = 60, seed: int = 1) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.users = [5_000_000_000 + u for u in range(users)]
        self.rng = random.Random(seed)
        self.sent: list[bytes] = []
        self.offsets: dict[int, dict[int, bytes]] = defaultdict(
            dict
        )  # partition -> offset -> value
        self._errors: list[str] = []
        self._lock = threading.Lock()
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 2,
                "partitioner": "murmur2_random",
            }
        )
        self._n = 0
        self._valid: list[tuple[bytes, bytes]] = []

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            with self._lock:
                self._errors.append(str(err))

    def next_value(self) -> tuple[bytes, bytes]:
        """A mostly valid event; now and then junk, a type clash, a retry, or a big one."""
        i = self._n
        self._n += 1
        uid = self.rng.choice(self.users)
        roll = self.rng.random()
        if roll < 0.01:
            return b'{"event_id": "junk-%d", "user_id": %d' % (i, uid), str(uid).encode()
        if roll < 0.02:
            return orjson.dumps({"event_id": f"x{i}", "user_id": uid, "inc": {"n": "one"}}), str(
                uid
            ).encode()
        if roll < 0.04 and self._valid:
            return self.rng.choice(self._valid)  # a client retry: same event, later offset
        kind = self.rng.random()
        if kind < 0.4:
            ev = {"inc": {"n": 1}, "max": {"last": i}}
        elif kind < 0.6:
            ev = {"append": {"log": {"value": i, "cap": 5}}}
        elif kind < 0.75:
            ev = {"set": {"s": {"k": i % 7}, "mode": self.rng.choice(["a", "b"])}}
        elif kind < 0.85:
            ev = {"set": {"mode": 3}}  # makes a later "inc mode.x" fail
        elif kind < 0.93:
            ev = {"inc": {"mode.x": 1}}
        elif kind < 0.97:
            ev = {"unset": ["s.k", "log"]}
        else:
            ev = {"set": {"blob": "z" * self.rng.randint(100, 1500)}}  # may pass the size limit
        out = orjson.dumps({"event_id": f"e{i}", "user_id": uid} | ev), str(uid).encode()
        self._valid.append(out)
        return out

    def publish(self, n: int, rate: float | None = None) -> None:
        t0 = time.monotonic()
        for k in range(n):
            value, key = self.next_value()
            self.sent.append(value)
            self._producer.produce(self.topic, value, key, on_delivery=self._on_delivery)
            self._producer.poll(0)
            if rate:
                ahead = t0 + (k + 1) / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
        self.flush()

    def publish_in_background(self, n: int, rate: float) -> threading.Thread:
        t = threading.Thread(target=self.publish, args=(n, rate), daemon=True)
        t.start()
        return t

    def flush(self) -> None:
        assert self._producer.flush(60) == 0, "events not delivered"
        assert not self._errors, self._errors[:3]
        self.read_back(self.bootstrap)

    def read_back(self, bootstrap: str) -> None:
        """Read the topic as the worker sees it (delivery reports of retried
        sends may lack their offset): fills :attr:`offsets`."""
        if sum(map(len, self.offsets.values())) == len(self.sent):
            return
        self.offsets.clear()
        c = reader(bootstrap)
        c.subscribe([self.topic])

        def read() -> int:
            for m in c.consume(1000, 0.2):
                if m.error() is None:
                    self.offsets[m.partition()][m.offset()] = m.value()
            return sum(map(len, self.offsets.values()))

        try:
            wait_for(read, f"the {len(self.sent)} sent events read back from {self.topic}",
                     until=lambda n: n >= len(self.sent), timeout=30, every=0)
        finally:
            c.close()
        assert sum(map(len, self.offsets.values())) == len(self.sent)

    def close(self) -> None:
        """Destroy the producer now, while the broker is still there (librdkafka's
        destructor waits for a broker that is gone)."""
        self._producer.flush(5)
        del self._producer

    def last_offsets(self) -> dict[int, int]:
        return {p: max(offs) for p, offs in self.offsets.items()}

    # -- what must be stored ---------------------------------------------------
    def expected(self) -> tuple[dict[int, dict], set[tuple[int, int]]]:
        """Per user, the one-by-one result in partition order; and the (partition,
        offset) of every message that must end in the DLQ."""
        bad: set[tuple[int, int]] = set()
        per_user: dict[int, list] = defaultdict(list)
        where: dict[int, tuple[int, int]] = {}
        for p, offs in self.offsets.items():
            for off in sorted(offs):
                try:
                    ev = parse_event(offs[off], max_bytes=MAX_BYTES)
                except EventError:
                    bad.add((p, off))
                    continue
                per_user[ev.user_id].append(ev)
                where[id(ev)] = (p, off)
        docs = {}
        for uid, evs in per_user.items():
            rejected: list = []
            docs[uid] = oracle(evs, MAX_BYTES, rejected, window=DEDUPE_IDS)
            bad |= {where[id(e)] for e in rejected}
        return docs, bad


def marks_behind(shard_urls: list[str], topic: str, last: dict[int, int]) -> dict[int, str]:
    """The partitions whose shards' best offset mark is short of ``last``, as
    ``{partition: "mark/last"}``; empty once every event was applied."""
    best: dict[int, int] = {}
    for url in shard_urls:
        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
            for p, off in conn.execute(
                'SELECT partition, "offset" FROM ingest_marks WHERE topic = %s', (topic,)
            ):
                best[p] = max(best.get(p, -1), off)
    return {p: f"{best.get(p, -1)}/{off}" for p, off in last.items() if best.get(p, -1) < off}



def stored_profiles(shard_urls: list[str]) -> dict[int, dict]:
    out = {}
    for url in shard_urls:
        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
            for uid, doc in conn.execute("SELECT user_id, doc::text FROM profiles"):
                out[uid] = orjson.loads(doc)
    return out


def reader(bootstrap: str) -> Consumer:
    """A consumer in a fresh group that reads from the start and never commits."""
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "group.protocol": "classic",
            "session.timeout.ms": 2000,
            "heartbeat.interval.ms": 500,
            "fetch.wait.max.ms": 20,
        }
    )


def read_topic(bootstrap: str, topic: str, settle: float = 1.0, timeout: float = 20.0) -> list[Any]:
    """Every message of ``topic`` (a fresh group from the start), once nothing new
    came for ``settle`` seconds."""
    c = reader(bootstrap)
    c.subscribe([topic])
    got: list[Any] = []
    deadline = time.monotonic() + scaled(timeout)
    quiet_since = time.monotonic()
    try:
        while time.monotonic() < deadline:
            batch = c.consume(500, 0.2)
            msgs = [m for m in batch if m.error() is None]
            if msgs:
                got += [orjson.loads(m.value()) for m in msgs]
                quiet_since = time.monotonic()
            elif got and time.monotonic() - quiet_since > settle:
                break
    finally:
        c.close()
    return got


def worker_env(
    shards: list[str], control: str, bootstrap: str, prefix: str, **extra: str
) -> dict[str, str]:
    return {
        **os.environ,
        "KVADRUPEL_SHARDS": ",".join(shards),
        "KVADRUPEL_CONTROL_DB": control,
        "KVADRUPEL_KAFKA_BOOTSTRAP": bootstrap,
        "KVADRUPEL_KAFKA_TOPIC_PREFIX": prefix,
        "KVADRUPEL_KAFKA_PARTITIONS": "4",
        "KVADRUPEL_KAFKA_SESSION_TIMEOUT_MS": "2000",
        "KVADRUPEL_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
        "KVADRUPEL_KAFKA_FETCH_WAIT_MAX_MS": "20",
        "KVADRUPEL_PROFILE_MAX_BYTES": str(MAX_BYTES),
        "KVADRUPEL_INGEST_DEDUPE_IDS": str(DEDUPE_IDS),
        "KVADRUPEL_LOG_LEVEL": "WARNING",
        **extra,
    }


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "kvadrupel.cli", "ingest"],
        env=env,
        cwd=ROOT,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target``; :meth:`cut` drops every
    connection and refuses new ones until :meth:`restore`."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port = port
        self.target = target
        self._sel = selectors.DefaultSelector()
        self._pairs: dict[socket.socket, socket.socket] = {}
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._stop = False
        self._listen()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        s.setblocking(False)
        self._listener = s
        self._sel.register(s, selectors.EVENT_READ, "accept")

    def cut(self) -> None:
        with self._lock:
            if self._listener is not None:
                self._sel.unregister(self._listener)
                self._listener.close()
                self._listener = None
            for a in list(self._pairs):
                self._drop(a)

    def restore(self) -> None:
        with self._lock:
            if self._listener is None:
                self._listen()

    def close(self) -> None:
        self._stop = True
        self.cut()
        self._thread.join(5)

    def _drop(self, a: socket.socket) -> None:
        b = self._pairs.pop(a, None)
        for s in (a, b):
            if s is None:
                continue
            self._pairs.pop(s, None)
            try:
                self._sel.unregister(s)
            except (KeyError, ValueError):
                pass
            s.close()

    def _run(self) -> None:
        while not self._stop:
            events = self._sel.select(0.05)
            with self._lock:
                for key, _ in events:
                    sock = key.fileobj
                    if key.data == "accept":
                        if sock is not self._listener:
                            continue
                        try:
                            client, _ = sock.accept()  # type: ignore[union-attr]
                            upstream = socket.create_connection(self.target, timeout=2)
                        except OSError:
                            continue
                        for s in (client, upstream):
                            s.setblocking(False)
                        self._pairs[client], self._pairs[upstream] = upstream, client
                        self._sel.register(client, selectors.EVENT_READ, "pipe")
                        self._sel.register(upstream, selectors.EVENT_READ, "pipe")
                    elif sock in self._pairs:
                        try:
                            data = sock.recv(65536)  # type: ignore[union-attr]
                            if not data:
                                raise OSError("closed")
                            self._pairs[sock].setblocking(True)  # type: ignore[index]
                            self._pairs[sock].sendall(data)  # type: ignore[index]
                            self._pairs[sock].setblocking(False)  # type: ignore[index]
                        except OSError:
                            self._drop(sock)  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def iter_dlq_sources(records: list[Any]) -> Iterator[tuple[int, int]]:
    for r in records:
        yield r["source"]["partition"], r["source"]["offset"]
