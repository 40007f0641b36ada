"""A real HTTP server on loopback standing in for FCM (and its OAuth2 token
endpoint) and for a signed-webhook gateway, checking requests as documented.

FCM (https://firebase.google.com/docs/cloud-messaging/send/v1-api and
https://developers.google.com/identity/protocols/oauth2/service-account):

* ``POST /token``: ``application/x-www-form-urlencoded`` with
  ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`` and ``assertion``, an
  RS256 JWT signed by the service account's key (verified with its public key):
  ``iss`` = client_email, ``scope`` = the firebase.messaging scope, ``aud`` = the
  token URI, ``exp`` - ``iat`` <= 3600, ``kid`` = private_key_id. Answers
  ``{"access_token", "expires_in", "token_type": "Bearer"}``.
* ``POST /v1/projects/{project}/messages:send``: ``Authorization: Bearer`` an
  issued token, JSON ``{"message": {"token", "notification": {"title", "body"},
  "data": {str: str}, ...}}``. Answers ``{"name": ...}``, or the documented error
  body (``UNREGISTERED`` 404, ``UNAVAILABLE`` 503, ``UNAUTHENTICATED`` 401).

Webhook: ``POST /hook`` with ``X-Kvadrupel-Timestamp`` and ``X-Kvadrupel-Signature:
sha256=HMAC(secret, ts + "." + body)``; refuses a bad signature or a stale
timestamp with 401; ``410`` for unregistered tokens.

Every request that fails a check is recorded in ``violations`` (tests assert it
stays empty) and answered 400.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"


def service_account(token_uri: str, project: str = "kvadrupel-test") -> tuple[dict[str, Any], Any]:
    """A fresh service-account key file (as a dict) and its public key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    info = {"type": "service_account", "project_id": project, "private_key_id": uuid.uuid4().hex,
            "private_key": pem, "client_email": f"push@{project}.iam.gserviceaccount.com",
            "client_id": "1", "token_uri": token_uri}
    return info, key.public_key()


def _fcm_error(code: int, status: str, message: str, fcm_code: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message, "status": status}
    if fcm_code:
        err["details"] = [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                           "errorCode": fcm_code}]
    return {"error": err}


@dataclass
class PushReceiver:
    project: str = "kvadrupel-test"
    webhook_secret: bytes = b"webhook-secret-0123456789"
    account: dict[str, Any] = field(default_factory=dict)
    public_key: Any = None
    unregistered: set[str] = field(default_factory=set)  # tokens answered UNREGISTERED / 410
    fail_next: int = 0  # answer this many sends with 503 UNAVAILABLE
    revoke_next: int = 0  # answer this many sends with 401 (token revoked)
    delivered: list[dict[str, Any]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    token_requests: int = 0
    issued: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.account, self.public_key = service_account(f"{self.url}/token", self.project)
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def tokens_delivered(self) -> list[str]:
        with self._lock:
            return [d["token"] for d in self.delivered]

    # -- checks ------------------------------------------------------------------------
    def _token(self, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        if headers.get("Content-Type", "").split(";")[0] != "application/x-www-form-urlencoded":
            return self._bad("token: not form-encoded")
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        if form.get("grant_type") != GRANT:
            return self._bad(f"token: grant_type {form.get('grant_type')!r}")
        try:
            header = jwt.get_unverified_header(form["assertion"])
            claims = jwt.decode(form["assertion"], self.public_key, algorithms=["RS256"],
                                audience=self.account["token_uri"],
                                options={"require": ["iss", "aud", "iat", "exp", "scope"]})
        except (KeyError, jwt.PyJWTError) as exc:
            return self._bad(f"token: assertion: {exc}")
        problems = []
        if header.get("kid") != self.account["private_key_id"]:
            problems.append("kid")
        if claims["iss"] != self.account["client_email"]:
            problems.append("iss")
        if claims["scope"] != SCOPE:
            problems.append("scope")
        if not 0 < claims["exp"] - claims["iat"] <= 3600 or abs(claims["iat"] - time.time()) > 60:
            problems.append("iat/exp")
        if problems:
            return self._bad(f"token: bad claims {problems}")
        access = "ya29." + uuid.uuid4().hex
        with self._lock:
            self.token_requests += 1
            self.issued.add(access)
        return 200, {"access_token": access, "expires_in": 3599, "token_type": "Bearer"}

    def _send(self, path: str, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        if path != f"/v1/projects/{self.project}/messages:send":
            return self._bad(f"send: path {path}")
        auth = headers.get("Authorization", "")
        with self._lock:
            if self.revoke_next > 0:
                self.revoke_next -= 1
                self.issued.discard(auth.removeprefix("Bearer "))
            ok = auth.startswith("Bearer ") and auth[7:] in self.issued
        if not ok:
            return 401, _fcm_error(
                401, "UNAUTHENTICATED", "Request had invalid authentication credentials."
            )
        try:
            msg = json.loads(body)["message"]
            token = msg["token"]
            note = msg["notification"]
            assert isinstance(token, str) and token
            assert isinstance(note["title"], str) and isinstance(note["body"], str)
            assert set(msg) <= {"token", "notification", "data", "android", "apns", "webpush"}
            assert all(
                isinstance(k, str) and isinstance(v, str) for k, v in msg.get("data", {}).items()
            )
        except (ValueError, KeyError, TypeError, AssertionError) as exc:
            return self._bad(f"send: bad message {exc!r}: {body[:200]!r}")
        with self._lock:
            if self.fail_next > 0:
                self.fail_next -= 1
                return 503, _fcm_error(503, "UNAVAILABLE", "The service is currently unavailable.",
                                       "UNAVAILABLE")
            if token in self.unregistered:
                return 404, _fcm_error(404, "NOT_FOUND", "Requested entity was not found.",
                                       "UNREGISTERED")
            self.delivered.append(msg)
        return 200, {"name": f"projects/{self.project}/messages/{uuid.uuid4().int}"}

    def _hook(self, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        ts = headers.get("X-Kvadrupel-Timestamp", "")
        sig = headers.get("X-Kvadrupel-Signature", "")
        expected = "sha256=" + hmac.new(self.webhook_secret, ts.encode() + b"." + body,
                                        hashlib.sha256).hexdigest()
        if not hmac.compare_digest(sig, expected):
            with self._lock:
                self.violations.append("hook: bad signature")
            return 401, {"error": "bad signature"}
        if not ts.isdigit() or abs(int(ts) - time.time()) > 300:
            with self._lock:
                self.violations.append("hook: stale timestamp")
            return 401, {"error": "stale"}
        msg = json.loads(body)
        if headers.get("Idempotency-Key") != msg.get("id"):
            return self._bad("hook: idempotency key")
        with self._lock:
            if self.fail_next > 0:
                self.fail_next -= 1
                return 500, {"error": "try later"}
            if msg["token"] in self.unregistered:
                return 410, {"error": "gone"}
            self.delivered.append(msg)
        return 202, {"ok": True}

    def _bad(self, why: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.violations.append(why)
        return 400, _fcm_error(400, "INVALID_ARGUMENT", why)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/token":
                    status, out = receiver._token(self.headers, body)
                elif self.path == "/hook":
                    status, out = receiver._hook(self.headers, body)
                else:
                    status, out = receiver._send(self.path, self.headers, body)
                data = json.dumps(out).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
