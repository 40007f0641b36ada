"""Load shedding: a bounded number of requests in flight per API process.

Past ``max_inflight`` concurrent HTTP requests the process answers at once with
``503`` + ``Retry-After`` (an RFC 9457 problem) instead of queueing the request
behind the ones it cannot finish, so that under overload clients get a fast,
retryable answer and the admitted requests keep their latency. The ops endpoints
(``/healthz``, ``/readyz``, ``/metrics``) are never shed: a load balancer and
Prometheus must still see the process. Long-polls (a ``since_version`` query) are
not counted either: they wait without work and have their own bound
(``banner_longpoll_max_waiters``, also answered 503 + Retry-After).
``max_inflight <= 0`` turns it off.

A pure ASGI middleware (the counter lives on the event loop's thread, so no lock);
``kvadrupel_http_shed_total`` counts the answers it sheds.
"""

from __future__ import annotations

from typing import Any

import orjson
from prometheus_client import Counter

__all__ = ["LoadShedMiddleware", "SHED"]

SHED = Counter(
    "kvadrupel_http_shed_total", "HTTP requests answered 503 by load shedding (too many in flight)"
)
_EXEMPT = ("/healthz", "/readyz", "/metrics")


class LoadShedMiddleware:
    def __init__(self, app: Any, max_inflight: int = 256, retry_after_s: int = 1) -> None:
        self.app = app
        self.max_inflight = max_inflight
        self.retry_after = str(retry_after_s).encode()
        self.inflight = 0
        self._body = orjson.dumps(
            {
                "type": "about:blank",
                "title": "Service unavailable",
                "status": 503,
                "detail": f"overloaded: more than {max_inflight} requests in flight; retry later",
            }
        )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (
            scope["type"] != "http"
            or self.max_inflight <= 0
            or scope.get("path") in _EXEMPT
            or b"since_version=" in scope.get("query_string", b"")  # long-polls: own bound
        ):
            await self.app(scope, receive, send)
            return
        if self.inflight >= self.max_inflight:
            SHED.inc()
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", b"application/problem+json"),
                        (b"retry-after", self.retry_after),
                        (b"content-length", str(len(self._body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": self._body})
            return
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1
