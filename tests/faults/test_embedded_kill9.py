"""kill -9 of a real embedded process (``kvadrupel embedded``: SQLite shards and the
in-process bus with its durable log, API and workers in one process) after it
acknowledged events with 202: restarted, it applies every acknowledged event
exactly once, and a client retrying a request changes nothing.

No external service is needed: these run everywhere, in seconds.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from tests.faults.ingestkit import ROOT, free_port
from tests.fixtures.waiting import wait_for

TOKENS = {
    "KVADRUPEL_ADMIN_TOKEN": "adm-" + "e" * 20,
    "KVADRUPEL_INGEST_TOKEN": "ing-" + "e" * 20,
    "KVADRUPEL_PORTAL_TOKEN": "por-" + "e" * 20,
}
USERS = range(4_000_001, 4_000_011)


class Embedded:
    """``kvadrupel embedded`` on a data dir of its own, restartable."""

    def __init__(self, data_dir: Path, log: Path, **extra: str) -> None:
        self.data_dir = data_dir
        self.log = log
        self.port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("KVADRUPEL_")},
            **TOKENS,
            "KVADRUPEL_DATA_DIR": str(data_dir),
            "KVADRUPEL_LOG_LEVEL": "WARNING",
            "KVADRUPEL_NIGHTLY_CRON": "off",
            **extra,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(  # noqa: S603 - our own CLI
            [sys.executable, "-m", "kvadrupel.cli", "embedded", "--port", str(self.port)],
            cwd=ROOT, env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        wait_for(self._healthy,
                 f"the embedded process to serve on port {self.port}\n{self._tail()}",
                 timeout=60, every=0.1)

    def _tail(self) -> str:
        return self.log.read_text()[-2000:] if self.log.exists() else ""

    def _healthy(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self._tail()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def post(self, events: list[dict[str, Any]]) -> int:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/events", data=orjson.dumps(events), method="POST",
            headers={"Authorization": f"Bearer {TOKENS['KVADRUPEL_INGEST_TOKEN']}",
                     "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def events(tag: str, per_user: int, users: Iterable[int] = USERS) -> list[dict[str, Any]]:
    """``per_user`` events per user, interleaved; each increments a counter of its own,
    so the profile shows which events applied and how often."""
    return [{"event_id": f"{tag}-{j}", "user_id": u, "inc": {f"c.{tag}-{j}": 1}}
            for j in range(per_user) for u in users]


def expected(requests: list[list[dict[str, Any]]]) -> dict[int, dict[str, int]]:
    out: dict[int, dict[str, int]] = {}
    for body in requests:
        for ev in body:
            (path,) = ev["inc"]
            out.setdefault(ev["user_id"], {})[path.removeprefix("c.")] = 1
    return out


def counters(data_dir: Path) -> dict[int, dict[str, int]]:
    """Each test user's counters, read from the SQLite shards (WAL: while they are written)."""
    out = {}
    for path in sorted(data_dir.glob("shard*.db")):
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            for uid, doc in db.execute("SELECT user_id, doc FROM profiles"):
                if uid in USERS:
                    out[uid] = orjson.loads(doc).get("c", {})
        finally:
            db.close()
    return out


def applied(data_dir: Path) -> int:
    return sum(len(c) for c in counters(data_dir).values())


def test_acknowledged_events_survive_kill_9_before_they_are_applied(tmp_path: Path) -> None:
    data = tmp_path / "data"
    app = Embedded(data, tmp_path / "embedded.log")
    app.start()
    locks = []
    try:
        # Given the shards' write locks held by the test: the ingest worker of the
        # process cannot apply anything (it waits for the lock, then retries)
        for path in sorted(data.glob("shard*.db")):
            db = sqlite3.connect(path, isolation_level=None, timeout=30)
            db.execute("BEGIN IMMEDIATE")
            locks.append(db)
        assert len(locks) == 2

        # When four requests are acknowledged with 202
        requests = [events(f"r{r}", per_user=3) for r in range(4)]
        for body in requests:
            assert app.post(body) == 202
        assert applied(data) == 0  # nothing applied: only the bus has them
        # and the process is killed with SIGKILL
        app.kill9()
    finally:
        for db in locks:
            db.execute("ROLLBACK")
            db.close()

    # Then, restarted, it applies every acknowledged event exactly once
    app.start()
    try:
        want = expected(requests)
        wait_for(lambda: applied(data), f"every acknowledged event applied\n{app._tail()}",
                 until=lambda n: n >= sum(map(len, want.values())), timeout=30, every=0.1)
        assert counters(data) == want

        # And a client retrying a request (same event ids) changes nothing: the
        # retry is followed by one more event per user, so once those applied, the
        # retried events (before them on each user's partition) were seen too
        assert app.post(requests[0]) == 202
        after = events("after", per_user=1)
        assert app.post(after) == 202
        want = expected([*requests, after])
        wait_for(lambda: applied(data), f"the events after the retry applied\n{app._tail()}",
                 until=lambda n: n >= sum(map(len, want.values())), timeout=30, every=0.1)
        assert counters(data) == want
    finally:
        app.stop()


def test_kill_9_right_after_202_loses_nothing_and_applies_nothing_twice(tmp_path: Path) -> None:
    # Given an embedded process with small ingest batches and a duplicate window of
    # one event id: a replay after a crash is absorbed by the shards' offset marks
    # alone, which needs the bus log to keep its offsets across restarts
    data = tmp_path / "data"
    app = Embedded(data, tmp_path / "embedded.log", KVADRUPEL_INGEST_DEDUPE_IDS="1",
                   KVADRUPEL_INGEST_BATCH_MAX="20", KVADRUPEL_INGEST_BATCH_MS="5")
    sent: list[list[dict[str, Any]]] = []
    behind = []
    try:
        # When, three times, it acknowledges a stream of requests and is killed
        # with SIGKILL right after the last 202
        for cycle in range(3):
            app.start()
            for r in range(8):
                body = events(f"k{cycle}r{r}", per_user=2)
                assert app.post(body) == 202
                sent.append(body)
            app.kill9()
            behind.append(sum(map(len, sent)) - applied(data))

        # Then, restarted once more, it applies every acknowledged event exactly once
        app.start()
        want = expected(sent)
        wait_for(lambda: applied(data),
                 f"every acknowledged event applied (behind at the kills: {behind})\n"
                 f"{app._tail()}",
                 until=lambda n: n >= sum(map(len, want.values())), timeout=30, every=0.1)
        assert counters(data) == want, f"behind at the kills: {behind}"
    finally:
        app.stop()
