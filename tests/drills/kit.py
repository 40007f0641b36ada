"""Helpers of the drill suite: a pausable TCP proxy in front of the broker, a
Tansu broker advertised at that proxy, supervised worker subprocesses, the
oracle and the summary table.

Why a broker of its own: the session's ``kafka_broker`` advertises its own
address in metadata, so clients bootstrapped through a proxy would connect to it
directly after the first metadata answer. The drill's broker (the same Tansu
binary, memory storage) advertises the proxy's port, so every client — the
workers and the test's own producer — reaches it only through the proxy, and
pausing the proxy really cuts the broker off.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fixtures.kafka import TansuBroker, _free_port, _wait_ready, tansu_binary
from tests.fixtures.waiting import scaled

ROOT = Path(__file__).resolve().parents[2]


# -- TCP proxy ---------------------------------------------------------------------
class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target``. ``pause()`` resets every open
    connection and refuses (accepts and resets) new ones until ``resume()``."""

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(256)
        self.port = self._listener.getsockname()[1]
        self._paused = threading.Event()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._closed = False
        self.connections = 0
        threading.Thread(target=self._accept_loop, name="drill-proxy", daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._paused.is_set():
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._conns.update((client, upstream))
                self.connections += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                self._drop(s)

    def _drop(self, s: socket.socket) -> None:
        with self._lock:
            self._conns.discard(s)
        _reset(s)

    def pause(self) -> None:
        self._paused.set()
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            self._drop(s)

    def resume(self) -> None:
        self._paused.clear()

    def close(self) -> None:
        self._closed = True
        self.pause()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()


def _reset(s: socket.socket) -> None:
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


def start_tansu_behind_proxy(log_dir: Path, attempts: int = 3) -> tuple[TansuBroker, TcpProxy]:
    """A memory-storage Tansu on a free port, advertised at a TcpProxy's port."""
    binary = tansu_binary()
    errors = []
    for _ in range(attempts):
        real = _free_port()
        proxy = TcpProxy(("127.0.0.1", real))
        cluster_id = f"drill-{uuid.uuid4()}"
        log_path = log_dir / f"tansu-{real}.log"
        log_file = log_path.open("wb")
        proc = subprocess.Popen(  # noqa: S603 - our own binary
            [
                str(binary),
                "broker",
                "--cluster-id",
                cluster_id,
                "--listener-url",
                f"tcp://127.0.0.1:{real}",
                "--advertised-listener-url",
                f"tcp://{proxy.address}",
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "NO_COLOR": "1"},
        )
        broker = TansuBroker(proxy.address, cluster_id, proc, log_path, log_file)
        try:
            _wait_ready(broker, 15.0)
        except Exception as exc:  # noqa: BLE001 - retried on another port
            errors.append(str(exc))
            broker.stop()
            proxy.close()
            continue
        return broker, proxy
    raise RuntimeError("drill broker did not start:\n" + "\n---\n".join(errors))


# -- worker processes ------------------------------------------------------------------
@dataclass
class Worker:
    """One ``kvadrupel <kind>`` subprocess, restartable; unexpected exits are counted
    (and the process restarted, as a supervisor would) by :meth:`Fleet.supervise`."""

    kind: str
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    unexpected_exits: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.proc = subprocess.Popen(  # noqa: S603 - our own CLI
            [sys.executable, "-m", "kvadrupel.cli", self.kind],
            cwd=ROOT,
            env=self.env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.starts += 1

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def rss_kib(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=scaled(timeout))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            return None


class Fleet:
    """The workers of a drill, with a supervisor thread that restarts a worker that
    exited by itself (recording its exit status)."""

    def __init__(self, workers: Sequence[Worker]) -> None:
        self.workers = list(workers)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="drill-supervisor", daemon=True)

    def start(self) -> None:
        for w in self.workers:
            w.start()
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            with self._lock:
                for w in self.workers:
                    if w.proc is not None and w.proc.poll() is not None:
                        w.unexpected_exits.append(w.proc.returncode)
                        w.start()

    def kill9_and_restart(self, w: Worker, down_s: float = 0.5) -> None:
        with self._lock:
            w.kill9()
            time.sleep(down_s)
            w.start()

    def stop(self) -> list[tuple[str, int | None]]:
        self._stop.set()
        self._thread.join(timeout=5)
        return [(w.kind, w.stop()) for w in self.workers]

    def unexpected(self) -> int:
        return sum(len(w.unexpected_exits) for w in self.workers)


def worker_env(
    *,
    shards: Sequence[str],
    control: str,
    bootstrap: str,
    prefix: str,
    data_dir: Path,
    smtp_url: str,
    tokens: dict[str, str],
    **extra: str,
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVADRUPEL_")}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "KVADRUPEL_DATA_DIR": str(data_dir),
            "KVADRUPEL_SHARDS": ",".join(shards),
            "KVADRUPEL_CONTROL_DB": control,
            "KVADRUPEL_KAFKA_BOOTSTRAP": bootstrap,
            "KVADRUPEL_KAFKA_TOPIC_PREFIX": prefix,
            "KVADRUPEL_KAFKA_PARTITIONS": "4",
            "KVADRUPEL_KAFKA_SESSION_TIMEOUT_MS": "2000",
            "KVADRUPEL_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
            "KVADRUPEL_KAFKA_FETCH_WAIT_MAX_MS": "20",
            "KVADRUPEL_SMTP_URL": smtp_url,
            "KVADRUPEL_SMTP_CONCURRENCY": "4",
            "KVADRUPEL_SMTP_TIMEOUT_S": "3",
            "KVADRUPEL_DELIVERY_CLAIM_TIMEOUT_S": "2",
            "KVADRUPEL_DELIVERY_RETRY_BASE_S": "0.2",
            "KVADRUPEL_DELIVERY_RETRY_MAX_S": "1",
            "KVADRUPEL_DELIVERY_MAX_ATTEMPTS": "1000",
            "KVADRUPEL_DELIVERY_SEND_CHUNK": "50",
            "KVADRUPEL_RANGE_MAX_ATTEMPTS": "50",
            "KVADRUPEL_SHUTDOWN_GRACE_S": "10",
            "KVADRUPEL_LOG_LEVEL": "WARNING",
            "KVADRUPEL_NIGHTLY_CRON": "off",
            "KVADRUPEL_ADMIN_TOKEN": tokens["admin_token"],
            "KVADRUPEL_INGEST_TOKEN": tokens["ingest_token"],
            "KVADRUPEL_PORTAL_TOKEN": tokens["portal_token"],
        }
    )
    env.update(extra)
    return env


# -- summary -------------------------------------------------------------------------
def table(rows: Sequence[tuple[str, Any]], title: str) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * (width + 14)]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines) + "\n"


def write_summary(text: str, name: str = "drills-summary.txt") -> Path:
    out = ROOT / "test-artifacts"
    out.mkdir(exist_ok=True)
    path = out / name
    with path.open("a") as f:
        f.write(text + "\n")
    return path
