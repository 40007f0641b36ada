"""The banner API's in-process cache of banner-set versions, and how it stays true.

Why a cache at all: a mobile app polls and the portal revalidates on page views, and
almost every such request carries an ``If-None-Match`` that still matches. If the
API knows each user's current banner-set version, it answers those with ``304``
from memory; the database sees only real changes and first visits.

**Invalidation: PostgreSQL LISTEN/NOTIFY, issued in the writing transaction.** The
shard store bumps ``banner_sets.version`` and calls ``pg_notify('kvadrupel_banners',
'<user>:<version> ...')`` in the same transaction (``shards.backends.sql``), so a
notice is delivered exactly when — and only if — the change commits, and carries the
new version. Each API process keeps one LISTEN connection per shard primary (a hot
standby cannot LISTEN) and applies the notices to its cache. Chosen over

* a version row read per request: correct, but one database round trip for every
  request is the very cost the cache exists to remove;
* the delivery worker's ``on_banners`` callback: it runs in the worker's process and
  misses dismissals and other writers; NOTIFY covers every writer of every process;
* a TTL: either stale answers for up to the TTL or little caching.

The cache is trusted only while its LISTEN connection is up: on disconnect it is
dropped and every request reads the database (correct, slower) until the listener
is back, when it starts empty under a new *epoch*. A read that raced with a notice
cannot put an older version back: every put carries the (epoch, notice sequence)
seen before its read and is reconciled with the notices since (``recent``), and a
put from before a reset is refused.

Writers in the same process (the embedded setup, the demo, tests) also announce
their changes synchronously after commit through the store's banner listeners, so
a change made in-process is visible to the very next request. On SQLite (embedded)
there is no NOTIFY; ``PRAGMA data_version`` — which changes whenever another
connection commits to the file — is checked on each lookup, so a writer in another
process still invalidates the cache (coarsely: the whole shard).

Long-poll waiters (``?since_version=V&wait=S``) are woken by the same notices.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from shards.replica import BANNER_CHANNEL, parse_payload

__all__ = ["ShardVersions", "VersionHub"]

log = logging.getLogger("kvadrupel.api.versions")

Token = tuple[int, int]  # (epoch, notice sequence) observed before a database read


class ShardVersions:
    """One shard's user → version cache (plus rendered bodies) and its waiters."""

    def __init__(self, index: int, *, users: int, bodies: int, recent: int = 65_536,
                 check: Callable[[], bool] | None = None) -> None:
        self.index = index
        self.users_cap = max(0, users)  # 0: no cache (every request reads the database)
        self.bodies_cap = max(0, bodies)
        self.recent_cap = max(1, recent)
        self.check = check  # SQLite: True while no other connection has committed
        self.live = False  # trusted? (LISTEN connected, or embedded)
        self.epoch = 0
        self.seq = 0
        self.floor = 0
        self.versions: OrderedDict[int, int] = OrderedDict()
        self.bodies: OrderedDict[int, tuple[int, bytes]] = OrderedDict()
        self.recent: OrderedDict[int, tuple[int, int]] = OrderedDict()  # user -> (seq, version)
        self._lock = threading.Lock()
        self._waiters: dict[int, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}
        self.hits = 0
        self.misses = 0
        self.notices = 0

    # -- lookups (event-loop thread) ------------------------------------------------
    def known(self, uid: int) -> int | None:
        """The user's current version if this process knows it for certain."""
        if not self.live:
            return None
        if self.check is not None and not self.check():
            self.reset(live=True)
            return None
        v = self.versions.get(uid)
        if v is None:
            r = self.recent.get(uid)
            if r is None:
                self.misses += 1
                return None
            v = r[1]
        self.hits += 1
        return v

    def at_least(self, uid: int) -> int:
        """A lower bound of the user's version (from notices): reads older than it are stale."""
        r = self.recent.get(uid)
        v = self.versions.get(uid, 0)
        return max(v, r[1]) if r is not None else v

    def body(self, uid: int, version: int) -> bytes | None:
        b = self.bodies.get(uid)
        if b is not None and b[0] == version:
            return b[1]
        return None

    def token(self) -> Token:
        return (self.epoch, self.seq)

    # -- updates (any thread) ----------------------------------------------------------
    def put(self, uid: int, version: int, body: bytes | None, token: Token) -> None:
        """Remember what a database read (begun at ``token``) returned."""
        with self._lock:
            epoch, seq = token
            if not self.live or epoch != self.epoch or seq < self.floor or not self.users_cap:
                return
            r = self.recent.get(uid)
            if r is not None and r[0] > seq and r[1] > version:
                version, body = r[1], None  # a newer change was announced during the read
            cur = self.versions.get(uid)
            if cur is not None and cur > version:
                return
            self.versions[uid] = version
            self.versions.move_to_end(uid)
            if len(self.versions) > self.users_cap:
                self.versions.popitem(last=False)
            if body is not None and self.bodies_cap:
                self.bodies[uid] = (version, body)
                self.bodies.move_to_end(uid)
                if len(self.bodies) > self.bodies_cap:
                    self.bodies.popitem(last=False)

    def changed(self, pairs: list[tuple[int, int]]) -> None:
        """Banner sets changed (a NOTIFY, or an in-process writer after commit)."""
        woken = []
        with self._lock:
            self.seq += 1
            self.notices += 1
            seq = self.seq
            for uid, version in pairs:
                r = self.recent.get(uid)
                if r is None or r[1] < version:
                    self.recent[uid] = (seq, version)
                    self.recent.move_to_end(uid)
                cur = self.versions.get(uid)
                if cur is not None and cur < version:
                    self.versions[uid] = version
                    self.bodies.pop(uid, None)
                if uid in self._waiters:
                    woken.append(uid)
            while len(self.recent) > self.recent_cap:
                _, (old_seq, _) = self.recent.popitem(last=False)
                self.floor = max(self.floor, old_seq)
            waiters = [w for uid in woken for w in self._waiters.get(uid, ())]
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_wake, fut)
            except RuntimeError:  # that loop is closed
                pass

    def reset(self, *, live: bool) -> None:
        """Forget everything (a new epoch); ``live`` says whether to trust what comes next."""
        with self._lock:
            self.epoch += 1
            self.versions.clear()
            self.bodies.clear()
            self.recent.clear()
            self.floor = self.seq
            self.live = live
            waiters = [w for ws in self._waiters.values() for w in ws]
        # Waiters re-check for themselves: a notice may have been missed.
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_wake, fut)
            except RuntimeError:
                pass

    # -- long-poll waiters (event-loop thread) -----------------------------------------
    def wait_handle(self, uid: int) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            self._waiters.setdefault(uid, []).append((loop, fut))
        return fut

    def drop_handle(self, uid: int, fut: asyncio.Future[None]) -> None:
        with self._lock:
            ws = self._waiters.get(uid)
            if ws is not None:
                ws[:] = [w for w in ws if w[1] is not fut]
                if not ws:
                    del self._waiters[uid]


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _SqliteCheck:
    """``PRAGMA data_version`` on a private connection: changes when anyone else commits."""

    def __init__(self, path: str) -> None:
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._last = self._read()

    def _read(self) -> int:
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def __call__(self) -> bool:
        with self._lock:
            v = self._read()
            if v == self._last:
                return True
            self._last = v
            return False

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class VersionHub:
    """All shards' caches and the feeds that keep them true (one per API process)."""

    def __init__(self, stores: list[Any], *, users: int, bodies: int) -> None:
        n = max(1, len(stores))
        self.stores = stores
        self.shards: list[ShardVersions] = []
        self._checks: list[_SqliteCheck] = []
        self._pg: list[tuple[int, str]] = []
        for i, store in enumerate(stores):
            engine = store.engine
            check = None
            if engine.dialect.name == "sqlite":
                path = engine.url.database
                if path and path != ":memory:":
                    check = _SqliteCheck(path)
                    self._checks.append(check)
            else:
                self._pg.append((i, engine.url.set(drivername="postgresql")
                                 .render_as_string(hide_password=False)))
            self.shards.append(ShardVersions(i, users=-(-users // n), bodies=-(-bodies // n),
                                             check=check))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listeners: list[tuple[Any, Callable[[list[tuple[int, int]]], None]]] = []
        self._started = False
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
            for sv, store in zip(self.shards, self.stores, strict=True):
                store.add_banner_listener(sv.changed)
                self._listeners.append((store, sv.changed))
                if sv.check is not None:
                    sv.check()
                    sv.reset(live=True)  # embedded: in-process notices + data_version
            ref = weakref.ref(self)
            for index, conninfo in self._pg:
                t = threading.Thread(target=_listen, args=(ref, index, conninfo, self._stop),
                                     name=f"banner-listen-{index}", daemon=True)
                t.start()
                self._threads.append(t)

    def wait_live(self, timeout: float = 5.0) -> bool:
        """Block until every shard's cache is trusted (tests, warm-up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(sv.live for sv in self.shards):
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self._stop.set()
        for store, fn in self._listeners:
            store.remove_banner_listener(fn)
        self._listeners.clear()
        for t in self._threads:
            t.join(timeout=2)
        for sv in self.shards:
            sv.reset(live=False)
        for c in self._checks:
            c.close()


def _listen(ref: weakref.ref[VersionHub], index: int, conninfo: str,
            stop: threading.Event) -> None:
    """LISTEN on one shard primary; reconnect with backoff; distrust the cache while down."""
    import psycopg

    backoff = 0.1
    while not stop.is_set():
        hub = ref()
        if hub is None:
            return
        sv = hub.shards[index]
        del hub
        try:
            with psycopg.connect(conninfo, autocommit=True, connect_timeout=5, keepalives=1,
                                 keepalives_idle=10, keepalives_interval=5,
                                 keepalives_count=3) as conn:
                conn.execute(f"LISTEN {BANNER_CHANNEL}")
                sv.reset(live=True)  # from here on every commit reaches us
                if backoff > 0.1:
                    log.info("shard %d: banner notices back; version cache on", index)
                backoff = 0.1
                idle = 0.0
                while not stop.is_set() and ref() is not None:
                    got = False
                    for n in conn.notifies(timeout=0.5):
                        sv.changed(parse_payload(n.payload))
                        got = True
                    idle = 0.0 if got else idle + 0.5
                    if idle >= 10:  # a quiet connection: make sure it is still there
                        conn.execute("SELECT 1")
                        idle = 0.0
        except Exception as exc:  # any failure: distrust the cache, retry
            if not stop.is_set():
                log.warning("shard %d: banner notices lost (%s); version cache off until "
                            "reconnected", index, str(exc).splitlines()[0] if str(exc) else exc)
        sv.reset(live=False)
        del sv
        stop.wait(backoff)
        backoff = min(backoff * 2, 5.0)
