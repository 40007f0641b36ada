"""Authentication: bearer service tokens and signed user tokens (JWT).

Service tokens (``KVADRUPEL_ADMIN_TOKEN``, ``_INGEST_TOKEN``, ``_PORTAL_TOKEN``)
guard the service endpoints through :func:`require`. The banner endpoints also take
user tokens for the mobile app: JWTs signed with HS256 (``KVADRUPEL_JWT_SECRET``)
or RS256/ES256 (``KVADRUPEL_JWT_PUBLIC_KEY``), with ``sub`` = the user id and
``exp`` required; such a token may read and dismiss only its own user's banners.

| token                          | own user | another user |
|--------------------------------|----------|--------------|
| none / malformed / bad / expired | 401    | 401          |
| portal or admin service token  | ok       | ok           |
| other service token (ingest)   | 401      | 401          |
| user JWT                       | ok       | 403          |

Verified JWTs are remembered (bounded, until their ``exp``) so the hot route pays
for the signature check once per token, not once per request.

``aud`` and ``iss`` are checked only when configured (``KVADRUPEL_JWT_AUDIENCE``,
``KVADRUPEL_JWT_ISSUER``); a configured one that the token lacks or does not match
is a 401, and so is an ``aud`` in a token when no audience is configured. With user
tokens accepted but no issuer configured, a warning is logged once per process at
start-up: any holder of the key may then mint tokens that pass.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from base.errors import ConfigError
from shards.router import parse_user_id

__all__ = ["AuthError", "Authenticator", "Principal", "bearer_scheme", "require"]

bearer_scheme = HTTPBearer(auto_error=False, description=(
    "A service token (portal/admin: any user) or, on the banner endpoints, a user JWT "
    "(`sub` = user id, `exp` required) for that user only."))
_bearer = bearer_scheme


def require(role: str) -> Callable[..., None]:
    """A dependency accepting the token configured for ``role`` (admin also passes)."""

    def check(request: Request,
              creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:  # noqa: B008
        tokens: dict[str, str] = request.app.state.tokens
        if creds is None or creds.scheme.lower() != "bearer":
            raise HTTPException(401, "missing bearer token")
        given = creds.credentials.encode()
        for allowed in (role, "admin"):
            expected = tokens.get(allowed, "")
            if expected and hmac.compare_digest(given, expected.encode()):
                return
        raise HTTPException(401, f"invalid token for {role} endpoints")

    return check


class AuthError(Exception):
    """Refused: ``status`` 401 (who are you?) or 403 (not yours)."""

    def __init__(self, status: int, detail: str, error: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        # RFC 6750 §3: the challenge says why a presented token was refused.
        self.challenge = f'Bearer error="{error}"' if error else "Bearer"


@dataclass(frozen=True, slots=True)
class Principal:
    kind: str  # "service" or "user"
    user_id: int | None = None  # the JWT's subject for kind "user"

    def may_access(self, user_id: int) -> bool:
        return self.kind == "service" or self.user_id == user_id


_SERVICE = Principal("service")
log = logging.getLogger("kvadrupel.api.auth")
_issuer_warning = threading.Lock()
_issuer_warned = False


def _warn_unchecked_issuer() -> None:
    """Once per process: user tokens are accepted and their issuer is not checked."""
    global _issuer_warned
    with _issuer_warning:
        if _issuer_warned:
            return
        _issuer_warned = True
    log.warning(
        "KVADRUPEL_JWT_ISSUER is not set: the issuer (iss) of user tokens is not checked; "
        "any token signed with the configured key is accepted. Set it to your identity "
        "provider's issuer (docs/api.md)"
    )
_ASYMMETRIC = ("RS", "PS", "ES", "Ed")


def _load_public_key(value: str) -> Any:
    if not value:
        return None
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    text = value if value.lstrip().startswith("-----BEGIN") else Path(value).read_text()
    try:
        return load_pem_public_key(text.encode())
    except ValueError as exc:
        raise ConfigError(f"KVADRUPEL_JWT_PUBLIC_KEY is not a PEM public key: {exc}") from None


class Authenticator:
    """Checks the ``Authorization`` header of the banner endpoints (thread-safe)."""

    def __init__(self, *, service_tokens: list[str], jwt_algorithms: list[str],
                 jwt_secret: str = "", jwt_public_key: str = "", audience: str = "",
                 issuer: str = "", leeway_s: int = 30, cache_size: int = 50_000,
                 clock: Callable[[], float] = time.time) -> None:
        self._tokens = [t.encode() for t in service_tokens if t]
        self.algorithms = [a for a in jwt_algorithms if a]
        self._secret = jwt_secret.encode() if jwt_secret else None
        if self._secret is not None and len(self._secret) < 32:
            # RFC 7518 §3.2: an HS256 key must be at least as long as the hash.
            raise ConfigError("KVADRUPEL_JWT_SECRET must be at least 32 bytes")
        self._public = _load_public_key(jwt_public_key)
        self.audience = audience or None
        self.issuer = issuer or None
        if self.issuer is None and (self._secret is not None or self._public is not None):
            _warn_unchecked_issuer()
        self.leeway = leeway_s
        self.clock = clock  # seconds since the epoch: the container's clock (time, not date)
        self._cache: dict[bytes, tuple[int, float]] = {}  # token -> (user id, exp)
        self._cache_size = cache_size

    def authenticate(self, header: bytes | None) -> Principal:
        if not header:
            raise AuthError(401, "missing bearer token")
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            raise AuthError(401, "the Authorization header must be 'Bearer <token>'",
                            "invalid_request")
        hit = self._cache.get(token)
        if hit is not None:
            uid, exp = hit
            if self.clock() <= exp + self.leeway:
                return Principal("user", uid)
            self._cache.pop(token, None)
            raise AuthError(401, "token expired", "invalid_token")
        for expected in self._tokens:
            if hmac.compare_digest(token, expected):
                return _SERVICE
        if token.count(b".") != 2:
            raise AuthError(401, "invalid token", "invalid_token")
        return self._verify_jwt(token)

    def authorize(self, header: bytes | None, user_id: int) -> Principal:
        p = self.authenticate(header)
        if not p.may_access(user_id):
            raise AuthError(403, "a user token may only access its own banners",
                            "insufficient_scope")
        return p

    def _verify_jwt(self, token: bytes) -> Principal:
        try:
            alg = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError:
            raise AuthError(401, "invalid token", "invalid_token") from None
        if alg not in self.algorithms:
            raise AuthError(401, f"token algorithm {str(alg)[:10]!r} is not accepted",
                            "invalid_token")
        # Each algorithm family has its own key, so an RSA public key can never be
        # (mis)used as an HMAC secret (the classic algorithm-confusion attack).
        key = self._public if str(alg).startswith(_ASYMMETRIC) else self._secret
        if key is None:
            raise AuthError(401, "user tokens are not configured", "invalid_token")
        try:
            claims = jwt.decode(token, key, algorithms=[alg], audience=self.audience,
                                issuer=self.issuer, leeway=self.leeway,
                                # Times are checked below against our clock, not PyJWT's.
                                options={"require": ["exp", "sub"], "verify_exp": False,
                                         "verify_nbf": False, "verify_iat": False})
        except jwt.PyJWTError as exc:
            raise AuthError(401, f"invalid token: {exc}", "invalid_token") from None
        now = self.clock()
        exp, nbf = claims["exp"], claims.get("nbf")
        if not isinstance(exp, int | float) or isinstance(exp, bool) or (
                nbf is not None and (not isinstance(nbf, int | float) or isinstance(nbf, bool))):
            raise AuthError(401, "invalid token: exp and nbf must be numbers", "invalid_token")
        if now > exp + self.leeway:
            raise AuthError(401, "token expired", "invalid_token")
        if nbf is not None and now < nbf - self.leeway:
            raise AuthError(401, "invalid token: not yet valid (nbf)", "invalid_token")
        try:
            uid = parse_user_id(claims["sub"])
        except ValueError:
            raise AuthError(401, "token subject is not a user id", "invalid_token") from None
        if len(self._cache) >= self._cache_size:
            try:
                self._cache.pop(next(iter(self._cache)), None)  # oldest first
            except (RuntimeError, StopIteration):  # changed meanwhile: drop it all
                self._cache.clear()
        self._cache[token] = (uid, float(claims["exp"]))
        return Principal("user", uid)
