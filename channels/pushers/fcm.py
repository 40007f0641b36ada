"""Firebase Cloud Messaging, HTTP v1 API.

Credentials are a Google service-account key (the JSON file from the Firebase
console: ``project_id``, ``client_email``, ``private_key``, ``private_key_id``,
``token_uri``), given as the file's path or its JSON text. Authentication is the
OAuth 2.0 JWT-bearer flow (RFC 7523) Google documents for service accounts: an
RS256-signed assertion ``{iss: client_email, scope: .../firebase.messaging, aud:
token_uri, iat, exp <= iat + 3600}`` is POSTed form-encoded to ``token_uri`` with
``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer``; the answer's
``access_token`` is reused until shortly before ``expires_in`` runs out (one
exchange per hour, not per message), and renewed once if FCM answers 401.

Each device token is one ``POST {endpoint}/v1/projects/{project_id}/messages:send``
with ``{"message": {"token", "notification": {title, body}, "data", "android":
{"collapse_key"}, "apns": {"headers": {"apns-collapse-id"}}}}`` (data values are
strings, as FCM requires). The HTTP v1 API has no multi-message request any more,
so a batch is sent as concurrent requests (``concurrency``) over one pool of
keep-alive connections, under one access token.

Errors, from the FCM error-code reference: ``UNREGISTERED`` (404), and
``INVALID_ARGUMENT`` naming the registration token, mean the token is dead: the
result says ``unregistered`` and the worker removes it from the profile.
``SENDER_ID_MISMATCH``, ``THIRD_PARTY_AUTH_ERROR`` and other 4xx are permanent;
``QUOTA_EXCEEDED`` (429), ``UNAVAILABLE`` (503), ``INTERNAL`` (500), timeouts and
connection errors are transient.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import jwt

from base.errors import ConfigError
from channels.push import Push, Pusher, PushResult

__all__ = ["FCM_ENDPOINT", "FCM_SCOPE", "FcmPusher", "load_service_account"]

FCM_ENDPOINT = "https://fcm.googleapis.com"
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_REFRESH_MARGIN_S = 300
_REQUIRED = ("project_id", "client_email", "private_key", "token_uri")


def load_service_account(credentials: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(credentials, dict):
        info = credentials
    else:
        text = credentials.strip()
        if not text:
            raise ConfigError("KVADRUPEL_PUSH_FCM_CREDENTIALS is empty")
        if not text.startswith("{"):
            try:
                text = Path(text).read_text()
            except OSError as exc:
                raise ConfigError(f"FCM credentials file: {exc}") from None
        try:
            info = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"FCM credentials are not JSON: {exc}") from None
    missing = [k for k in _REQUIRED if not info.get(k)]
    if missing:
        raise ConfigError(f"FCM service account lacks {', '.join(missing)}")
    return info


class FcmPusher(Pusher):
    name = "fcm"

    def __init__(self, credentials: str | dict[str, Any], *, endpoint: str | None = None,
                 concurrency: int = 32, timeout: float = 10.0) -> None:
        self.account = load_service_account(credentials)
        self.endpoint = (endpoint or FCM_ENDPOINT).rstrip("/")
        self.url = f"{self.endpoint}/v1/projects/{self.account['project_id']}/messages:send"
        self.concurrency = max(1, concurrency)
        self.timeout = timeout
        self._client: httpx.AsyncClient | None = None
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_lock: asyncio.Lock | None = None
        self.token_exchanges = 0

    # -- OAuth2 ----------------------------------------------------------------
    def assertion(self, now: float | None = None) -> str:
        iat = int(now if now is not None else time.time())
        claims = {"iss": self.account["client_email"], "scope": FCM_SCOPE,
                  "aud": self.account["token_uri"], "iat": iat, "exp": iat + 3600}
        headers = (
            {"kid": self.account["private_key_id"]} if self.account.get("private_key_id") else None
        )
        return jwt.encode(claims, self.account["private_key"], algorithm="RS256", headers=headers)

    async def _access_token(self, client: httpx.AsyncClient, stale: str | None = None) -> str:
        """The current access token; a new one when it is expiring or is ``stale``
        (refused by FCM: concurrent requests that saw the same 401 renew it once)."""
        if self._token_lock is None:
            self._token_lock = asyncio.Lock()
        async with self._token_lock:
            if self._token and self._token != stale and time.time() < self._token_expires:
                return self._token
            resp = await client.post(self.account["token_uri"],
                                     data={"grant_type": GRANT_TYPE, "assertion": self.assertion()})
            if resp.status_code != 200:
                raise _TokenError(f"token exchange: HTTP {resp.status_code}: {resp.text[:300]}",
                                  permanent=resp.status_code in (400, 401, 403))
            body = resp.json()
            self._token = str(body["access_token"])
            self._token_expires = time.time() + max(
                60, int(body.get("expires_in", 3600)) - _REFRESH_MARGIN_S
            )
            self.token_exchanges += 1
            return self._token

    # -- sending ---------------------------------------------------------------
    def _client_for_loop(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.timeout,
                limits=httpx.Limits(max_connections=self.concurrency,
                                    max_keepalive_connections=self.concurrency))
        return self._client

    @staticmethod
    def body(push: Push) -> dict[str, Any]:
        data = {str(k): str(v) for k, v in push.data.items()}
        if push.link:
            data.setdefault("link", push.link)
        message: dict[str, Any] = {
            "token": push.token,
            "notification": {"title": push.title, "body": push.body},
        }
        if data:
            message["data"] = data
        if push.message_id:
            collapse = push.message_id[:64]
            message["android"] = {"collapse_key": collapse}
            message["apns"] = {"headers": {"apns-collapse-id": collapse}}
        return {"message": message}

    async def send_many(self, pushes: Sequence[Push]) -> list[PushResult]:
        if not pushes:
            return []
        client = self._client_for_loop()
        try:
            await self._access_token(client)
        except (_TokenError, httpx.HTTPError, KeyError, ValueError) as exc:
            permanent = isinstance(exc, _TokenError) and exc.permanent
            return [PushResult(p, ok=False, permanent=False, error=f"fcm auth: {exc}"
                               + (" (check the service account)" if permanent else ""))
                    for p in pushes]
        sem = asyncio.Semaphore(self.concurrency)

        async def one(p: Push) -> PushResult:
            async with sem:
                return await self._send(client, p)

        return list(await asyncio.gather(*(one(p) for p in pushes)))

    async def _send(self, client: httpx.AsyncClient, push: Push) -> PushResult:
        payload = self.body(push)
        token: str | None = None
        for attempt in (1, 2):
            try:
                token = await self._access_token(client, stale=token)
                resp = await client.post(self.url, json=payload,
                                         headers={"Authorization": f"Bearer {token}"})
            except (_TokenError, httpx.HTTPError) as exc:
                return PushResult(push, ok=False, error=f"fcm: {type(exc).__name__}: {exc}")
            if resp.status_code == 200:
                return PushResult(push, ok=True)
            if resp.status_code == 401 and attempt == 1:
                continue  # the access token was revoked or expired early: renew once
            return _classify(push, resp)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class _TokenError(Exception):
    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def _classify(push: Push, resp: httpx.Response) -> PushResult:
    status, code, message = resp.status_code, "", ""
    try:
        err = resp.json().get("error", {})
        message = str(err.get("message", ""))
        code = str(err.get("status", ""))
        for d in err.get("details") or ():
            if str(d.get("@type", "")).endswith("google.firebase.fcm.v1.FcmError") and d.get(
                "errorCode"
            ):
                code = str(d["errorCode"])
    except (ValueError, AttributeError):
        pass
    error = f"fcm: HTTP {status} {code}: {message[:200]}".rstrip(": ")
    if code == "UNREGISTERED" or (code == "INVALID_ARGUMENT" and "registration token" in message):
        return PushResult(push, ok=False, permanent=True, unregistered=True, error=error)
    if status in (429, 500, 502, 503, 504) or code in ("QUOTA_EXCEEDED", "UNAVAILABLE", "INTERNAL"):
        return PushResult(push, ok=False, error=error)
    return PushResult(push, ok=False, permanent=400 <= status < 500, error=error)
