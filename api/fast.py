"""The lean path for ``GET /v1/users/{id}/banners`` — the busiest request of the system.

:class:`BannerApi` holds the logic (auth, version cache, reads, long-poll) and is
used by both ways in:

* :class:`BannerFastPath`, a plain ASGI middleware placed in front of FastAPI's
  routing. A well-formed GET for the banners is answered right there: header scan,
  bearer check (verified JWTs are remembered), one dict lookup for the version and
  precomputed header bytes — no request object, no dependency injection, no
  validation layer, no ``Response`` object. A revalidation whose ETag still matches
  costs a few microseconds and no database round trip.
* the documented FastAPI route in ``api.routes.banners``, which receives whatever
  the fast path passes on (malformed ids or query values: it answers with the
  proper 422 problem) and describes the endpoint in the OpenAPI document.

Both give the same answers for the same request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import orjson

from api.auth import AuthError
from api.versions import ShardVersions, VersionHub
from base import metrics
from base.errors import ShardUnavailable
from shards import replica

if TYPE_CHECKING:
    from api.services import Services

__all__ = ["BannerApi", "BannerFastPath", "Reply", "install"]

log = logging.getLogger("kvadrupel.api.banners")

Headers = list[tuple[bytes, bytes]]
Reply = tuple[int, Headers, bytes]

_PREFIX = "/v1/users/"
_SUFFIX = "/banners"
_JSON = (b"content-type", b"application/json")
_PROBLEM = (b"content-type", b"application/problem+json")
_MAX_ID = 2**63 - 1
# The FastAPI route's template (api.routes.banners): requests answered here and
# there are counted in the same series.
ROUTE = "/v1/users/{user_id}/banners"


def problem_reply(status: int, title: str, detail: str, extra: Headers | None = None) -> Reply:
    body = orjson.dumps({"type": "about:blank", "title": title, "status": status,
                         "detail": detail})
    return status, [_PROBLEM, (b"content-length", str(len(body)).encode()), *(extra or ())], body


def etag_matches(header: bytes, etag: bytes) -> bool:
    """RFC 9110 §13.1.2: weak comparison against a list of entity tags, or ``*``."""
    if header == etag:
        return True
    for part in header.split(b","):
        tag = part.strip()
        if tag == b"*":
            return True
        if tag.startswith(b"W/"):
            tag = tag[2:]
        if tag == etag:
            return True
    return False


class BannerApi:
    """Banner reads for one API process: shared by the fast path and the FastAPI route."""

    def __init__(self, services: Services) -> None:
        s = services.settings
        self.services = services
        self.settings = s
        self.auth = services.authenticator()
        replica.configure(retry_s=s.replica_retry_s, max_lag_bytes=s.replica_max_lag_bytes)
        self._cc = (b"cache-control", f"private, max-age={s.banner_max_age_s}".encode())
        # Waiting long-polls hold slots of the load shedder (api/shedding.py): keep at
        # least half of its in-flight slots for everything else.
        inflight = int(getattr(s, "api_max_inflight", 0) or 0)
        self.max_waiters = (s.banner_longpoll_max_waiters if inflight <= 0 else
                            min(s.banner_longpoll_max_waiters, max(1, inflight // 2)))
        self.max_wait = float(s.banner_longpoll_max_wait_s)
        self.waiting = 0
        self._hub: VersionHub | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.poll_s = 1.0  # re-check period of a waiter whose cache cannot be trusted alone
        self.closers: list[Any] = []  # run at close (a worker process closes its services)

    # -- lifetime ----------------------------------------------------------------------
    @property
    def hub(self) -> VersionHub:
        hub = self._hub
        if hub is None:
            s = self.settings
            shards = self.services.shards
            hub = VersionHub(shards.stores, users=s.banner_cache_users,
                             bodies=s.banner_cache_bodies)
            self.router = shards.router
            hub.start()
            self._hub = hub
        return hub

    def start(self) -> None:
        self.hub  # noqa: B018 - builds the hub and starts its listeners

    def close(self) -> None:
        if self._hub is not None:
            self._hub.close()
            self._hub = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        while self.closers:
            self.closers.pop()()

    async def _run(self, fn: Any, *args: Any) -> Any:
        if self._executor is None:
            # Database reads: a few threads (each shard's pool has 5+5 connections).
            self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="banners")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- replies -----------------------------------------------------------------------
    def _etag(self, uid: int, version: int) -> tuple[bytes, bytes]:
        return b'"%d-%d"' % (uid, version), b"%d" % version

    def _ok(self, etag: tuple[bytes, bytes], body: bytes) -> Reply:
        return 200, [_JSON, (b"content-length", str(len(body)).encode()), (b"etag", etag[0]),
                     (b"banner-version", etag[1]), self._cc], body

    def _not_modified(self, etag: tuple[bytes, bytes]) -> Reply:
        return 304, [(b"etag", etag[0]), (b"banner-version", etag[1]), self._cc], b""

    def _read(self, store: Any, uid: int, min_version: int) -> tuple[int, bytes]:
        version, items = store.banners(uid, min_version)
        return version, orjson.dumps({"banners": items})

    def _read_version(self, store: Any, uid: int, min_version: int) -> int:
        return int(store.banner_version(uid, min_version))

    def _shard(self, uid: int) -> tuple[ShardVersions, Any]:
        hub = self.hub
        i = self.router.shard_of(uid)
        return hub.shards[i], hub.stores[i]

    # -- GET -----------------------------------------------------------------------------
    async def get(self, uid: int, inm: bytes | None, since: int | None = None,
                  wait: float = 0.0) -> Reply:
        try:
            if since is not None:
                return await self._long_poll(uid, since, wait)
            return await self._get(uid, inm)
        except ShardUnavailable as exc:
            log.warning("banners of user %d: %s", uid, exc)
            return problem_reply(503, "Service unavailable", "storage temporarily unavailable",
                                 [(b"retry-after", b"1")])

    async def _get(self, uid: int, inm: bytes | None) -> Reply:
        sv, store = self._shard(uid)
        v = sv.known(uid)
        if v is not None:
            etag = self._etag(uid, v)
            if inm is not None and etag_matches(inm, etag[0]):
                return self._not_modified(etag)
            body = sv.body(uid, v)
            if body is not None:
                return self._ok(etag, body)
        token = sv.token()
        version, body = await self._run(self._read, store, uid, sv.at_least(uid))
        sv.put(uid, version, body, token)
        etag = self._etag(uid, version)
        if inm is not None and etag_matches(inm, etag[0]):
            return self._not_modified(etag)
        return self._ok(etag, body)

    async def _version(self, sv: ShardVersions, store: Any, uid: int) -> int:
        v = sv.known(uid)
        if v is not None:
            return v
        token = sv.token()
        version = await self._run(self._read_version, store, uid, sv.at_least(uid))
        sv.put(uid, version, None, token)
        return int(version)

    async def _long_poll(self, uid: int, since: int, wait: float) -> Reply:
        sv, store = self._shard(uid)
        wait = min(max(wait, 0.0), self.max_wait)
        current = await self._version(sv, store, uid)
        if current != since:
            return await self._get(uid, None)
        if wait <= 0:
            return self._not_modified(self._etag(uid, current))
        if self.waiting >= self.max_waiters:
            return problem_reply(503, "Service unavailable",
                                 f"too many waiting requests ({self.max_waiters}); poll later",
                                 [(b"retry-after", b"5")])
        self.waiting += 1
        try:
            deadline = time.monotonic() + wait
            while True:
                fut = sv.wait_handle(uid)
                try:
                    # Only re-check the version when woken — or, where notices alone
                    # cannot be trusted (SQLite's other processes, a lost LISTEN), every
                    # poll_s seconds.
                    trust = sv.live and sv.check is None
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    timeout = remaining if trust else min(remaining, self.poll_s)
                    try:
                        await asyncio.wait_for(fut, timeout)
                    except TimeoutError:
                        pass
                finally:
                    sv.drop_handle(uid, fut)
                current = await self._version(sv, store, uid)
                if current != since:
                    return await self._get(uid, None)
                if time.monotonic() >= deadline:
                    break
        finally:
            self.waiting -= 1
        return self._not_modified(self._etag(uid, current))

    # -- dismiss -----------------------------------------------------------------------
    async def dismiss(self, uid: int, banner_id: str) -> bool:
        _, store = self._shard(uid)
        return bool(await self._run(store.dismiss, uid, banner_id))


def _parse_uid(raw: str) -> int | None:
    if not raw or len(raw) > 19 or not raw.isdigit() or not raw.isascii() or raw[0] == "0":
        return None
    uid = int(raw)
    return uid if uid <= _MAX_ID else None


def _parse_query(qs: bytes) -> tuple[int | None, float] | None:
    """``(since_version, wait)``; None when anything needs FastAPI's validation."""
    since: int | None = None
    wait = 0.0
    for part in qs.split(b"&"):
        if not part:
            continue
        key, _, value = part.partition(b"=")
        if key == b"since_version":
            if not value.isdigit() or len(value) > 18:
                return None
            since = int(value)
        elif key == b"wait":
            try:
                wait = float(value)
            except ValueError:
                return None
            if not 0 <= wait <= 3600:  # NaN fails too
                return None
    return since, wait


class _RequestMetrics:
    """What api.observability.MetricsMiddleware records for a routed request, for
    the requests answered here (which never reach it): its metrics, its labels.
    The labelled children are looked up once, not per request."""

    def __init__(self) -> None:
        self.latency = metrics.HTTP_LATENCY.labels(ROUTE)
        self.counts: dict[int, Any] = {}

    def record(self, status: int, seconds: float) -> None:
        counter = self.counts.get(status)
        if counter is None:
            counter = self.counts[status] = metrics.HTTP_REQUESTS.labels(ROUTE, "GET", str(status))
        counter.inc()
        self.latency.observe(seconds)


class BannerFastPath:
    """ASGI middleware answering well-formed banner GETs before FastAPI routing."""

    def __init__(self, app: Any, api: BannerApi) -> None:
        self.app = app
        self.api = api
        self.metrics = _RequestMetrics()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                receive = self._lifespan(receive)
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if (scope["method"] != "GET" or not path.startswith(_PREFIX)
                or not path.endswith(_SUFFIX)):
            await self.app(scope, receive, send)
            return
        uid = _parse_uid(path[10:-8])
        q = _parse_query(scope["query_string"]) if scope["query_string"] else (None, 0.0)
        if uid is None or q is None:
            await self.app(scope, receive, send)  # FastAPI answers with the 422
            return
        start = time.perf_counter()
        auth = inm = None
        for k, v in scope["headers"]:
            if k == b"authorization":
                auth = v
            elif k == b"if-none-match":
                inm = v
        try:
            self.api.auth.authorize(auth, uid)
            status, headers, body = await self.api.get(uid, inm, q[0], q[1])
        except AuthError as exc:
            extra = [(b"www-authenticate", exc.challenge.encode())] if exc.status == 401 else []
            status, headers, body = problem_reply(
                exc.status, "Unauthorized" if exc.status == 401 else "Forbidden", exc.detail,
                extra)
        except Exception:
            log.exception("banner request failed")
            status, headers, body = problem_reply(500, "Internal server error",
                                                  "unexpected error; it has been logged")
        try:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        finally:
            self.metrics.record(status, time.perf_counter() - start)

    def _lifespan(self, receive: Any) -> Any:
        api = self.api

        async def wrapped() -> dict[str, Any]:
            message: dict[str, Any] = await receive()
            if message["type"] == "lifespan.startup":
                api.start()
            elif message["type"] == "lifespan.shutdown":
                api.close()
            return message

        return wrapped


def install(app: Any, services: Services) -> BannerApi:
    """Put the fast path in front of ``app``'s routing (the route module uses
    ``app.state.banner_api``)."""
    api = BannerApi(services)
    app.state.banner_api = api
    app.add_middleware(BannerFastPath, api=api)
    return api
