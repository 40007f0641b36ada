"""Which scheduler replica leads: only the leader runs APScheduler and fires jobs.

* PostgreSQL control DB: a session-level advisory lock held on a dedicated
  connection. The server releases it when that session ends — the process died,
  or its connection broke — and a standby replica, trying every
  ``scheduler_poll_s``, takes over. The leader pings its connection at the same
  pace and steps down at once when it fails (it may have lost the lock).
* SQLite control DB (embedded): one process only; an exclusive ``flock`` on a
  file next to the database keeps a second ``kvadrupel scheduler`` on standby.

Leadership is the first guard; the second is the firing key (``runs.fire_key``,
unique): a firing seen twice — two leaders for a moment after a network split,
a restart inside the catch-up window — still makes one run.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from abc import ABC, abstractmethod
from typing import IO, Any

from sqlalchemy import Engine, text

__all__ = ["Leadership", "leadership_for"]

log = logging.getLogger("kvadrupel.scheduler")

LOCK_KEY = 0x6B76_7363  # "kvsc"


class Leadership(ABC):
    @abstractmethod
    def acquire(self) -> bool:
        """Try to become the leader (never blocks)."""

    @abstractmethod
    def alive(self) -> bool:
        """Still the leader? (False also releases what is left of the lease.)"""

    @abstractmethod
    def release(self) -> None: ...


class PgLeadership(Leadership):
    def __init__(self, engine: Engine, key: int = LOCK_KEY) -> None:
        self.engine = engine
        self.key = key
        self._conn: Any = None

    def acquire(self) -> bool:
        try:
            conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        except Exception as exc:  # noqa: BLE001 - the control DB may be down: stand by
            log.warning("scheduler: cannot reach the control DB (%s)", exc)
            return False
        try:
            got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar()
        except Exception:  # noqa: BLE001
            conn.invalidate()
            conn.close()
            return False
        if not got:
            conn.close()
            return False
        self._conn = conn
        return True

    def alive(self) -> bool:
        if self._conn is None:
            return False
        try:
            self._conn.execute(text("SELECT 1"))
            return True
        except Exception as exc:  # noqa: BLE001
            log.error("scheduler: lost the leadership connection (%s)", exc)
            self.release()
            return False

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        # Session locks survive a rollback, so this connection must not go back to
        # the pool holding it: close the session itself.
        try:
            conn.invalidate()
        finally:
            conn.close()


_process_locks: dict[str, threading.Lock] = {}


class FileLeadership(Leadership):
    def __init__(self, path: str | None) -> None:
        self.path = path
        self._file: IO[bytes] | None = None
        self._lock: threading.Lock | None = None

    def acquire(self) -> bool:
        if self.path is None:  # in-memory database: this process is the only one
            lock = _process_locks.setdefault(":memory:", threading.Lock())
            if not lock.acquire(blocking=False):
                return False
            self._lock = lock
            return True
        f = open(self.path, "ab")  # noqa: SIM115 - held for as long as we lead
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        self._file = f
        return True

    def alive(self) -> bool:
        return self._file is not None or self._lock is not None

    def release(self) -> None:
        if self._file is not None:
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            finally:
                self._file.close()
                self._file = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def leadership_for(control: Engine) -> Leadership:
    if control.dialect.name == "postgresql":
        return PgLeadership(control)
    db = control.url.database
    if not db or db == ":memory:":
        return FileLeadership(None)
    return FileLeadership(os.path.abspath(db) + ".scheduler.lock")
