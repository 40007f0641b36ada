"""A generic signed webhook: each push is one JSON POST to an in-house gateway.

Request::

    POST <url>
    Content-Type: application/json
    X-Kvadrupel-Timestamp: 1764000000
    X-Kvadrupel-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>." + body)>
    Idempotency-Key: <message id>

    {"id": "<user>.<rule>.<episode>", "token": "...", "title": "...", "body": "...",
     "link": "...", "data": {...}}

The receiver recomputes the signature over the timestamp and the raw body,
compares in constant time and refuses stale timestamps (replay). Answers: 2xx
sent; ``410 Gone`` the token is unregistered (removed from the profile); other
4xx permanent; 408, 429, 5xx, timeouts and connection errors transient.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Sequence

import httpx
import orjson

from base.errors import ConfigError
from channels.push import Push, Pusher, PushResult

__all__ = ["SIGNATURE_HEADER", "TIMESTAMP_HEADER", "WebhookPusher", "sign"]

SIGNATURE_HEADER = "X-Kvadrupel-Signature"
TIMESTAMP_HEADER = "X-Kvadrupel-Timestamp"


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    return (
        "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    )


class WebhookPusher(Pusher):
    name = "webhook"

    def __init__(
        self, url: str, secret: str, *, concurrency: int = 32, timeout: float = 10.0
    ) -> None:
        if not url:
            raise ConfigError("KVADRUPEL_PUSH_WEBHOOK_URL is empty")
        if len(secret.encode()) < 16:
            raise ConfigError("KVADRUPEL_PUSH_WEBHOOK_SECRET must be at least 16 bytes")
        self.url = url
        self._secret = secret.encode()
        self.concurrency = max(1, concurrency)
        self.timeout = timeout
        self._client: httpx.AsyncClient | None = None

    def request(self, push: Push, now: float | None = None) -> tuple[bytes, dict[str, str]]:
        body = orjson.dumps({"id": push.message_id, "token": push.token, "title": push.title,
                             "body": push.body, "link": push.link, "data": push.data})
        ts = str(int(now if now is not None else time.time()))
        headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: ts,
                   SIGNATURE_HEADER: sign(self._secret, ts, body)}
        if push.message_id:
            headers["Idempotency-Key"] = push.message_id
        return body, headers

    async def send_many(self, pushes: Sequence[Push]) -> list[PushResult]:
        if not pushes:
            return []
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.timeout,
                limits=httpx.Limits(max_connections=self.concurrency,
                                    max_keepalive_connections=self.concurrency))
        client = self._client
        sem = asyncio.Semaphore(self.concurrency)

        async def one(p: Push) -> PushResult:
            async with sem:
                body, headers = self.request(p)
                try:
                    resp = await client.post(self.url, content=body, headers=headers)
                except httpx.HTTPError as exc:
                    return PushResult(p, ok=False, error=f"webhook: {type(exc).__name__}: {exc}")
                s = resp.status_code
                if 200 <= s < 300:
                    return PushResult(p, ok=True)
                error = f"webhook: HTTP {s}: {resp.text[:200]}"
                if s == 410:
                    return PushResult(p, ok=False, permanent=True, unregistered=True, error=error)
                if s in (408, 429) or s >= 500:
                    return PushResult(p, ok=False, error=error)
                return PushResult(p, ok=False, permanent=True, error=error)

        return list(await asyncio.gather(*(one(p) for p in pushes)))

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
