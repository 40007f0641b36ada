"""Bearer-token checks for the three audiences: admin, ingest and portal."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

_bearer = HTTPBearer(auto_error=False)


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
