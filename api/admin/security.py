"""Who is signed in, what they may do, and CSRF protection.

* **Sessions**: Starlette's ``SessionMiddleware`` keeps ``{"u": user, "g": session
  generation, "csrf": token}`` in a cookie signed with itsdangerous (HttpOnly,
  SameSite=Lax, ``Path=/admin``, Secure when ``admin_cookie_secure`` is set or the
  public URL is https, expiring after ``admin_session_max_age_s``). The account is
  re-read on every request, so a role change applies at once; signing out, a
  password or role change and disabling the account bump the account's generation
  (control DB), which ends every session of it — a copy of the cookie included.
* **Sign-in throttle**: :class:`LoginThrottle`, per client address and per account.
* **Roles** are checked here, on the server, for every route; the templates only
  hide buttons a role cannot use.
* **CSRF**: every unsafe request must carry the session's token, as the
  ``csrf_token`` form field or the ``X-CSRF-Token`` header (compared in constant
  time), and a cross-site ``Origin`` is refused outright.
"""

from __future__ import annotations

import hmac
import secrets
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from starlette.datastructures import FormData

__all__ = [
    "ANY_ROLE",
    "Admin",
    "AnyUser",
    "Approver",
    "CsrfForm",
    "Editor",
    "SignedIn",
    "EDITORS",
    "APPROVERS",
    "ADMINS",
    "ClientAddress",
    "LoginThrottle",
    "Wait",
    "NotSignedIn",
    "csrf_form",
    "csrf_token",
    "current_user",
    "require",
]

ANY_ROLE = ("analyst", "approver", "admin")
EDITORS = ("analyst", "approver", "admin")  # write and test rules, request activation
APPROVERS = ("approver", "admin")  # activate, pause, approve others' requests, start runs
ADMINS = ("admin",)  # accounts and settings

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class NotSignedIn(Exception):
    """Raised by :func:`current_user`; the app answers with a redirect to the sign-in page."""


def csrf_token(request: Request) -> str:
    token = request.session.get("csrf")
    if not isinstance(token, str) or len(token) < 32:
        token = secrets.token_urlsafe(32)
        request.session["csrf"] = token
    return token


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        # Browsers send Origin on every cross-site POST; a missing one is a
        # same-origin navigation or a non-browser client (which still needs the token).
        return origin is None
    # Behind a proxy that rewrites Host, the public name arrives as X-Forwarded-Host.
    hosts = {request.headers.get("host", ""), request.headers.get("x-forwarded-host", "")}
    return origin.split("://", 1)[-1] in hosts - {""}


async def csrf_form(request: Request) -> FormData:
    """The request's form, after checking its CSRF token (a dependency of every POST)."""
    form = await request.form()
    if request.method in SAFE_METHODS:
        return form
    if not _same_origin(request):
        raise HTTPException(403, "cross-site request refused")
    expected = request.session.get("csrf")
    given = request.headers.get("x-csrf-token") or form.get("csrf_token")
    if (
        not isinstance(expected, str)
        or not isinstance(given, str)
        or not hmac.compare_digest(given.encode(), expected.encode())
    ):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
    return form


def current_user(request: Request) -> dict[str, Any]:
    """The signed-in, active account (re-read from the control DB)."""
    cached: dict[str, Any] | None = getattr(request.state, "user", None)
    if cached is not None:
        return cached
    name = request.session.get("u")
    if not isinstance(name, str):
        raise NotSignedIn()
    user: dict[str, Any] | None = request.app.state.accounts.find(name)
    if user is None or not user["active"] or user["session_gen"] != request.session.get("g"):
        request.session.pop("u", None)
        request.session.pop("g", None)
        raise NotSignedIn()
    request.state.user = user
    return user


def require(*roles: str) -> Callable[..., dict[str, Any]]:
    """A dependency: the signed-in user, who must have one of ``roles`` (else 403)."""

    def check(user: Annotated[dict[str, Any], Depends(current_user)]) -> dict[str, Any]:
        if user["role"] not in roles:
            raise HTTPException(403, f"your role ({user['role']}) may not do this")
        return user

    return check


class _Bounded(OrderedDict[str, Any]):
    """A map of at most ``cap`` entries: the least recently touched one goes first
    (one entry, not the whole map, so a flood of new keys never wipes the rest)."""

    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap = cap

    def touch(self, key: str, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.cap:
            self.popitem(last=False)


@dataclass(frozen=True, slots=True)
class Wait:
    """Why a sign-in attempt must wait, and for how long (seconds)."""

    seconds: float
    reason: str  # "address" (this client failed too often) or "account" (slowed down)


class LoginThrottle:
    """Failed sign-ins, counted per client address and per account (per process).

    * **Per address** (a hard limit): after ``address_limit`` failures from one
      address within ``window`` seconds — whatever names they tried — that address
      waits until the oldest of them is ``window`` old. Only that address waits.
    * **Per account** (a slowdown, never a lockout): once failures for one name come
      from ``account_addresses`` or more *distinct* addresses within ``window``,
      each further attempt on that name waits ``account_delay_s`` after the latest
      failure, doubling with each further address, at most ``account_delay_max_s``.
      One address alone never slows an account down (its own limit stops it first),
      so a flood from one address cannot keep the real user out; and an address
      that signed in to the name within ``known_for`` seconds is not slowed down
      for it at all (only by its own address limit).
    * **Memory** is bounded: at most ``max_entries`` addresses and as many names are
      kept (least recently touched dropped first), and at most
      ``_ADDRESSES_PER_ACCOUNT`` addresses per name.

    Time comes from ``clock`` (seconds; the container's ``clock.time``).
    """

    _ADDRESSES_PER_ACCOUNT = 64

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        window: float = 900.0,
        address_limit: int = 20,
        account_addresses: int = 3,
        account_delay_s: float = 2.0,
        account_delay_max_s: float = 60.0,
        known_for: float = 30 * 86400.0,
        max_entries: int = 10_000,
    ) -> None:
        self.clock = clock
        self.window = window
        self.address_limit = address_limit
        self.account_addresses = account_addresses
        self.account_delay_s = account_delay_s
        self.account_delay_max_s = account_delay_max_s
        self.known_for = known_for
        self._addresses = _Bounded(max_entries)  # address -> deque of failure times
        self._accounts = _Bounded(max_entries)  # name -> {address: latest failure time}
        self._known = _Bounded(max_entries)  # name -> {address: latest sign-in time}
        self._lock = threading.Lock()

    def _address_fails(self, address: str, now: float) -> deque[float]:
        fails: deque[float] = self._addresses.get(address) or deque(maxlen=self.address_limit)
        while fails and now - fails[0] >= self.window:
            fails.popleft()
        if not fails:
            self._addresses.pop(address, None)
        return fails

    def _account_fails(self, name: str, now: float) -> dict[str, float]:
        fails: dict[str, float] = self._accounts.get(name) or {}
        for addr in [a for a, t in fails.items() if now - t >= self.window]:
            del fails[addr]
        if not fails:
            self._accounts.pop(name, None)
        return fails

    def account_delay(self, distinct: int) -> float:
        """The wait between attempts on a name failed from ``distinct`` addresses."""
        if distinct < self.account_addresses:
            return 0.0
        steps = min(distinct - self.account_addresses, 30)
        return min(self.account_delay_max_s, self.account_delay_s * 2.0**steps)

    def _check(self, address: str, name: str, now: float) -> Wait | None:
        fails = self._address_fails(address, now)
        if len(fails) >= self.address_limit:
            return Wait(self.window - (now - fails[0]), "address")
        acct = self._account_fails(name, now)
        delay = self.account_delay(len(acct))
        known = self._known.get(name) or {}
        if delay and now - known.get(address, float("-inf")) >= self.known_for:
            left = delay - (now - max(acct.values()))
            if left > 0:
                return Wait(left, "account")
        return None

    def blocked_for(self, address: str, name: str) -> Wait | None:
        """None if ``address`` may try to sign in as ``name`` now (counts nothing)."""
        with self._lock:
            return self._check(address, name, self.clock())

    def attempt(self, address: str, name: str) -> Wait | None:
        """Like :meth:`blocked_for`, and when the attempt may go ahead it is counted
        as a failure at once (so concurrent attempts cannot slip past the limits);
        :meth:`succeeded` takes it back."""
        now = self.clock()
        with self._lock:
            wait = self._check(address, name, now)
            if wait is not None:
                return wait
            fails = self._address_fails(address, now)
            fails.append(now)
            self._addresses.touch(address, fails)
            acct = self._account_fails(name, now)
            acct.pop(address, None)
            acct[address] = now
            while len(acct) > self._ADDRESSES_PER_ACCOUNT:
                del acct[next(iter(acct))]
            self._accounts.touch(name, acct)
        return None

    def succeeded(self, address: str, name: str) -> None:
        """The attempt was right: it is not a failure of the address, and the
        account's slowdown ends."""
        with self._lock:
            fails = self._addresses.get(address)
            if fails:
                fails.pop()
                if not fails:
                    self._addresses.pop(address, None)
            self._accounts.pop(name, None)
            known = self._known.get(name) or {}
            known.pop(address, None)
            known[address] = self.clock()
            while len(known) > self._ADDRESSES_PER_ACCOUNT:
                del known[next(iter(known))]
            self._known.touch(name, known)


def _networks(values: list[str]) -> list[IPv4Network | IPv6Network]:
    out = []
    for v in values:
        try:
            out.append(ip_network(v.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"KVADRUPEL_ADMIN_TRUSTED_PROXIES: {v!r} is not an IP address or network"
            ) from None
    return out


def _ip(text: str) -> IPv4Address | IPv6Address | None:
    try:
        return ip_address(text.strip())
    except ValueError:
        return None


class ClientAddress:
    """The client's address for the throttle: the peer's, or — when the peer is a
    trusted proxy — the right-most ``X-Forwarded-For`` entry that is not a trusted
    proxy. IPv6 addresses count per /64 (one host usually holds the whole /64)."""

    def __init__(self, trusted_proxies: list[str]) -> None:
        self.trusted = _networks(trusted_proxies)

    def _is_trusted(self, ip: IPv4Address | IPv6Address | None) -> bool:
        return ip is not None and any(ip in net for net in self.trusted)

    def __call__(self, request: Request) -> str:
        peer = request.client.host if request.client else ""
        ip = _ip(peer)
        if self._is_trusted(ip):
            forwarded = ",".join(request.headers.getlist("x-forwarded-for"))
            for hop in reversed([h for h in forwarded.split(",") if h.strip()]):
                hop_ip = _ip(hop)
                if hop_ip is None:
                    break  # garbage from beyond the proxies: stop at the last good hop
                ip = hop_ip
                if not self._is_trusted(hop_ip):
                    break
        if ip is None:
            return peer[:64] or "?"
        if isinstance(ip, IPv6Address):
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ip_network(f"{ip}/64", strict=False))
        return str(ip)


# Route parameter types: ``form: CsrfForm`` checks the token; ``user: Editor`` the role.
CsrfForm = Annotated[FormData, Depends(csrf_form)]
SignedIn = Annotated[dict[str, Any], Depends(current_user)]
AnyUser = Annotated[dict[str, Any], Depends(require(*ANY_ROLE))]
Editor = Annotated[dict[str, Any], Depends(require(*EDITORS))]
Approver = Annotated[dict[str, Any], Depends(require(*APPROVERS))]
Admin = Annotated[dict[str, Any], Depends(require(*ADMINS))]
