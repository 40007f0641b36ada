"""Health, readiness and metrics for every process.

The API serves ``/healthz``, ``/readyz`` and ``/metrics`` itself; workers start a
small HTTP server on ``KVADRUPEL_OPS_PORT`` (0 = none) that serves the same three.

* ``/healthz``: the process is alive (always 200 while it runs).
* ``/readyz``: it can reach what it needs: the control DB, every shard and the
  bus; 503 with the failing checks otherwise.
* ``/metrics``: Prometheus text format. With several API worker processes set
  ``PROMETHEUS_MULTIPROC_DIR`` and the registry aggregates them.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from base.metrics import metrics_payload

__all__ = ["metrics_payload", "readiness", "serve_ops"]

log = logging.getLogger("kvadrupel.ops")


def readiness(container: Any, timeout: float = 2.0) -> tuple[bool, dict[str, str]]:
    """Check every dependency; return (all ok, {check: "ok" | reason})."""
    checks: dict[str, str] = {}

    def probe(name: str, fn: Any) -> None:
        try:
            fn()
            checks[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure is "not ready", with its reason
            checks[name] = (
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            )

    def db(engine: Any) -> Any:
        def ping() -> None:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        return ping

    probe("control_db", db(container.control))
    for store in container.shards.stores:
        probe(f"shard_{store.index}", db(store.engine))
    probe("bus", lambda: container.bus.ping(timeout))
    return all(v == "ok" for v in checks.values()), checks


def serve_ops(container: Any, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer | None:  # noqa: S104
    """Start the ops HTTP server in a daemon thread (``port`` 0: do nothing)."""
    if not port:
        return None

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/healthz":
                self._send(200, b'{"status":"ok"}', "application/json")
            elif self.path == "/readyz":
                ok, checks = readiness(container)
                self._send(200 if ok else 503, orjson.dumps({"ready": ok, "checks": checks}),
                           "application/json")
            elif self.path == "/metrics":
                self._send(200, metrics_payload(), CONTENT_TYPE_LATEST)
            else:
                self._send(404, b'{"title":"Not found"}', "application/problem+json")

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:  # keep stdout for JSON logs only
            return

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="ops-http", daemon=True).start()
    log.info("ops endpoints on port %d", server.server_address[1])
    return server
