"""Reads from a shard's replica, falling back to the primary; banner-change notices.

``KVADRUPEL_SHARD_REPLICAS`` gives each PostgreSQL shard a read replica. The banner
API reads there, but a replica may be down or behind, and the client must never
notice either:

* **down** — a connection or query error on the replica marks it down for
  ``retry_s`` seconds (reads go straight to the primary meanwhile, without waiting
  for a connect timeout on every request), then it is tried again;
* **behind** — two checks. Per user: the caller passes a predicate (``fresh``) such
  as "the banner-set version is at least the one the API already heard of from the
  primary's NOTIFY"; a stale answer is thrown away and the primary asked. Per
  replica: at most once a second the replay position of a standby is compared with
  the primary's WAL position; past ``max_lag_bytes`` the replica is skipped until
  the next check.

Embedded SQLite shards have no replica: reads use the store's read engine.

This module also fixes the format of the banner-change notices: channel
``kvadrupel_banners``, payload ``"<user>:<version> <user>:<version> ..."`` split
below PostgreSQL's 8000-byte NOTIFY limit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError, OperationalError

__all__ = [
    "BANNER_CHANNEL",
    "ReplicaPolicy",
    "ReplicaReads",
    "configure",
    "notify_payloads",
    "parse_payload",
    "make_replica_reads",
]

log = logging.getLogger("kvadrupel.replica")
T = TypeVar("T")

BANNER_CHANNEL = "kvadrupel_banners"
_MAX_PAYLOAD = 7900  # PostgreSQL refuses NOTIFY payloads of 8000 bytes or more


def notify_payloads(pairs: Iterable[tuple[int, int]]) -> Iterator[str]:
    """``[(user, version)]`` → payload strings, each under the NOTIFY size limit."""
    part: list[str] = []
    size = 0
    for uid, version in pairs:
        item = f"{uid}:{version}"
        if part and size + len(item) + 1 > _MAX_PAYLOAD:
            yield " ".join(part)
            part, size = [], 0
        part.append(item)
        size += len(item) + 1
    if part:
        yield " ".join(part)


def parse_payload(payload: str) -> list[tuple[int, int]]:
    out = []
    for item in payload.split():
        uid, _, version = item.partition(":")
        try:
            out.append((int(uid), int(version)))
        except ValueError:
            log.warning("ignoring malformed banner notice item %r", item[:40])
    return out


@dataclass
class ReplicaPolicy:
    retry_s: float = 5.0
    max_lag_bytes: int = 1 << 20
    probe_every_s: float = 1.0


_policy = ReplicaPolicy()


def configure(*, retry_s: float | None = None, max_lag_bytes: int | None = None,
              probe_every_s: float | None = None) -> None:
    """Set the process-wide policy (the API does this from its settings at start)."""
    if retry_s is not None:
        _policy.retry_s = retry_s
    if max_lag_bytes is not None:
        _policy.max_lag_bytes = max_lag_bytes
    if probe_every_s is not None:
        _policy.probe_every_s = probe_every_s


def _lsn(value: str | None) -> int | None:
    if not value:
        return None
    hi, _, lo = value.partition("/")
    return (int(hi, 16) << 32) + int(lo, 16)


class RawConnections:
    """One plain autocommit psycopg connection per thread for an engine's database.

    For the hottest reads only (a prepared single-row query): no pool checkout, no
    pre-ping round trip, no SQLAlchemy result layer. A connection that fails is
    dropped and made again on next use.
    """

    def __init__(self, engine: Engine) -> None:
        self.conninfo = engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False)
        self._local = threading.local()
        self._all: list[psycopg.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def get(self) -> psycopg.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=5)
            with self._lock:
                if self._closed:
                    conn.close()
                    raise psycopg.OperationalError("store closed")
                self._all.append(conn)
            self._local.conn = conn
        return conn

    def drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with self._lock:
                if conn in self._all:
                    self._all.remove(conn)
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._all = self._all, []
        for c in conns:
            try:
                c.close()
            except Exception:  # noqa: S110 - closing a dead connection: nothing to do
                pass


class ReplicaReads:
    """Where one shard's reads go. Thread-safe; the counters are for tests and metrics."""

    def __init__(self, index: int, primary: Engine, replica: Engine | None,
                 policy: ReplicaPolicy | None = None) -> None:
        self.index = index
        self.primary = primary
        self.replica = replica
        # Plain per-thread connections for the prepared banner reads (PostgreSQL only).
        self.raw = primary.dialect.name == "postgresql"
        self._raw: dict[int, RawConnections] = {}
        self.policy = policy or _policy
        self.down_until = 0.0
        self.lagging = False
        self._next_probe = 0.0
        self._probe_lock = threading.Lock()
        self.replica_reads = 0
        self.primary_reads = 0
        self.stale = 0  # replica answers thrown away as behind
        self.failures = 0  # replica errors

    # -- state -------------------------------------------------------------------
    def usable(self) -> bool:
        if self.replica is None:
            return False
        now = time.monotonic()
        if now < self.down_until:
            return False
        if now >= self._next_probe and self._probe_lock.acquire(blocking=False):
            try:
                self._probe(now)
            finally:
                self._probe_lock.release()
        return not self.lagging and time.monotonic() >= self.down_until

    def mark_down(self, exc: BaseException) -> None:
        self.failures += 1
        first = time.monotonic() >= self.down_until
        self.down_until = time.monotonic() + self.policy.retry_s
        if first:
            log.warning("shard %d: replica unavailable, reading from the primary for %.0fs: %s",
                        self.index, self.policy.retry_s,
                        str(exc).splitlines()[0] if str(exc) else exc)

    def _probe(self, now: float) -> None:
        self._next_probe = now + self.policy.probe_every_s
        assert self.replica is not None
        try:
            with self.replica.connect() as conn:
                in_recovery, replay = conn.execute(
                    text("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text")).one()
        except (OperationalError, DBAPIError) as exc:
            self.mark_down(exc)
            return
        if not in_recovery:  # not a standby (or promoted): nothing to lag behind
            self.lagging = False
            return
        try:
            with self.primary.connect() as conn:
                current = conn.execute(text("SELECT pg_current_wal_lsn()::text")).scalar()
        except (OperationalError, DBAPIError):
            return  # the primary's trouble is not the replica's: keep the last verdict
        a, b = _lsn(current), _lsn(replay)
        lag = (a - b) if a is not None and b is not None else 0
        was = self.lagging
        self.lagging = lag > self.policy.max_lag_bytes
        if self.lagging != was:
            log.warning("shard %d: replica %s (replay lag %d bytes)", self.index,
                        "behind, reading from the primary" if self.lagging else "caught up", lag)

    # -- reading -----------------------------------------------------------------
    def read(self, fn: Callable[[Any], T], fresh: Callable[[T], bool] | None = None, *,
             raw: bool = False) -> T:
        """``fn(connection)`` on the replica if usable and its answer is ``fresh``;
        otherwise on the primary (whose errors propagate). ``raw``: ``fn`` gets a plain
        psycopg connection (see :class:`RawConnections`) instead of a SQLAlchemy one."""
        if self.usable():
            assert self.replica is not None
            try:
                result = self._call(self.replica, fn, raw, retry=False)
            except (OperationalError, DBAPIError) as exc:
                if not _is_connection_problem(exc):
                    raise
                self.mark_down(exc)
            except psycopg.OperationalError as exc:
                self.mark_down(exc)
            else:
                if fresh is None or fresh(result):
                    self.replica_reads += 1
                    return result
                self.stale += 1
        self.primary_reads += 1
        return self._call(self.primary, fn, raw, retry=True)

    def _call(self, engine: Engine, fn: Callable[[Any], T], raw: bool, *, retry: bool) -> T:
        if not raw:
            with engine.connect() as conn:
                return fn(conn)
        pool = self._raw.get(id(engine))
        if pool is None:
            pool = self._raw.setdefault(id(engine), RawConnections(engine))
        try:
            return fn(pool.get())
        except psycopg.OperationalError:
            pool.drop()
            if not retry:
                raise
        # Once more on a new connection: the old one may have died while idle (the
        # pre-ping a pool would have done, paid only when needed).
        try:
            return fn(pool.get())
        except psycopg.OperationalError:
            pool.drop()
            raise

    def close(self) -> None:
        """Close the plain connections (the engines belong to the store)."""
        for pool in list(self._raw.values()):
            pool.close()


def _is_connection_problem(exc: DBAPIError) -> bool:
    # OperationalError covers connection loss, refused connections, recovery
    # conflicts and "database does not allow connections"; a programming error in
    # the query would fail on the primary as well, so it is not hidden here.
    return isinstance(exc, OperationalError) or exc.connection_invalidated


def make_replica_reads(index: int, engine: Any, read_engine: Any) -> ReplicaReads:
    """The :class:`ReplicaReads` of a shard: its replica where it has one (PostgreSQL),
    else the read engine (SQLite: the same file without the write lock)."""
    if engine.dialect.name == "postgresql":
        return ReplicaReads(index, engine, read_engine if read_engine is not engine else None)
    return ReplicaReads(index, read_engine, None)
