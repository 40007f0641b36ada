"""The durable log of the embedded bus: one SQLite file in WAL mode.

:class:`engine.buses.memory.MemoryBus` keeps every partition in memory; given a
path it also keeps them here, so that what ``flush`` confirmed survives the
process (``kill -9``, and with ``synchronous=FULL`` an OS crash or power loss):
messages with their (topic, partition, offset), each group's committed offsets,
the partition count of each topic and where each partition's log now starts.
On restart the bus reloads what is still here with the *same* offsets — the
ingest worker's exactly-once mechanism keys its shard marks on (topic,
partition, offset), so the log must never renumber.

Why SQLite and not an append-only file with fsync:

* a flush group (many messages) is one transaction: all of it or none of it is
  on disk after a crash, so there is no torn tail to detect and cut on open;
* committed offsets, the log start after a trim, and the topics live in the same
  file with the same atomicity; trimming is a range ``DELETE`` on the primary key
  instead of segment files to rotate;
* it is in the standard library and already the embedded storage of the project.

In WAL mode a commit appends its pages to the ``-wal`` file: one sequential write.
``synchronous=FULL`` additionally fsyncs the WAL at every commit — the commit is
then durable against power loss; ``NORMAL`` fsyncs only at checkpoints — a commit
still survives the *process* dying (it is in the OS page cache) but the last ones
can roll back if the machine loses power. Appends use FULL (this is what a 202
promises, like Kafka's ``acks=all``); the cost is one fsync per flush *group*, not
per message, because the bus writes everything published meanwhile in one
transaction. Offset commits use NORMAL: losing one only replays messages
(at-least-once; ingest skips them by its marks), and the WAL is written in order,
so the next FULL append makes every earlier commit durable too.

``locking_mode=EXCLUSIVE`` makes the connection hold the file's lock for its whole
life: a second process opening the same log fails at once with :class:`BusError`
instead of writing conflicting offsets (the in-process bus cannot be shared
between processes). With an exclusive lock SQLite also needs no shared-memory
index for the WAL.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from base.errors import BusError

__all__ = ["LogState", "SqliteLog"]

SCHEMA_VERSION = 1
# ``starts``: where a partition's log starts once a trim removed its head (every
# group had committed past it), kept so that offsets continue after a restart even
# when a trim removed every message.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS topics (
    name TEXT PRIMARY KEY, partitions INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    topic TEXT NOT NULL, part INTEGER NOT NULL, off INTEGER NOT NULL,
    key BLOB, value BLOB NOT NULL,
    PRIMARY KEY (topic, part, off)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS starts (
    topic TEXT NOT NULL, part INTEGER NOT NULL, off INTEGER NOT NULL,
    PRIMARY KEY (topic, part)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS commits (
    grp TEXT NOT NULL, topic TEXT NOT NULL, part INTEGER NOT NULL, off INTEGER NOT NULL,
    PRIMARY KEY (grp, topic, part)) WITHOUT ROWID;
"""

Row = tuple[str, int, int, bytes | None, bytes]  # topic, partition, offset, key, value


@dataclass
class LogState:
    """What :meth:`SqliteLog.load` found."""

    topics: dict[str, int] = field(default_factory=dict)  # name -> partitions
    starts: dict[tuple[str, int], int] = field(default_factory=dict)  # log start offset
    messages: dict[tuple[str, int], list[tuple[int, bytes | None, bytes]]] = field(
        default_factory=dict)  # (topic, partition) -> [(offset, key, value)], in offset order
    commits: dict[str, dict[tuple[str, int], int]] = field(default_factory=dict)  # group -> offsets


class SqliteLog:
    """Append-only partitions, committed offsets and trims in one SQLite file.

    Thread-safe: one connection (it holds the exclusive lock), one mutex.
    Every ``sqlite3`` error becomes :class:`BusError`.
    """

    def __init__(self, path: str | Path, *, synchronous: str = "FULL") -> None:
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
        self.path = Path(path)
        self.synchronous = synchronous.upper()
        self._mutex = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE).
            self._db = sqlite3.connect(self.path, timeout=0.0, isolation_level=None,
                                       check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise BusError(f"cannot open the bus log {self.path}: {exc}") from exc
        try:
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("BEGIN IMMEDIATE")  # takes, and keeps, the exclusive lock
            for stmt in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                self._db.execute(stmt)
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise BusError(f"bus log {self.path} has schema version {version}, "
                               f"this Kvadrupel knows {SCHEMA_VERSION}")
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._db.execute("COMMIT")
            self._db.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as exc:
            self._db.close()
            if "locked" in str(exc) or "busy" in str(exc):
                raise BusError(f"the bus log {self.path} is in use by another process "
                               "(the embedded bus lives in one process)") from exc
            raise BusError(f"cannot open the bus log {self.path}: {exc}") from exc
        except BaseException:
            self._db.close()
            raise
        self._sync_now = ""
        self._closed = False

    # -- internals ----------------------------------------------------------------
    def _tx(self, synchronous: str, work: Callable[[sqlite3.Connection], object]) -> None:
        """Run ``work(connection)`` in one write transaction at the given sync level."""
        with self._mutex:
            if self._closed:
                raise BusError("the bus log is closed")
            try:
                if self._sync_now != synchronous:  # a per-connection setting, outside tx
                    self._db.execute(f"PRAGMA synchronous={synchronous}")
                    self._sync_now = synchronous
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    work(self._db)
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise BusError(f"bus log {self.path}: {exc}") from exc

    # -- API ----------------------------------------------------------------------
    def load(self) -> LogState:
        state = LogState()
        with self._mutex:
            try:
                db = self._db
                state.topics = dict(db.execute("SELECT name, partitions FROM topics"))
                state.starts = {(t, p): o for t, p, o in db.execute(
                    "SELECT topic, part, off FROM starts")}
                for t, p, o, k, v in db.execute("SELECT topic, part, off, key, value FROM messages "
                                                "ORDER BY topic, part, off"):
                    state.messages.setdefault((t, p), []).append((o, k, v))
                for g, t, p, o in db.execute("SELECT grp, topic, part, off FROM commits"):
                    state.commits.setdefault(g, {})[(t, p)] = o
            except sqlite3.Error as exc:
                raise BusError(f"bus log {self.path}: {exc}") from exc
        return state

    def add_topic(self, name: str, partitions: int) -> None:
        self._tx("NORMAL", lambda db: db.execute(
            "INSERT OR IGNORE INTO topics (name, partitions) VALUES (?, ?)", (name, partitions)))

    def append(self, rows: Iterable[Row]) -> None:
        """Write messages in one transaction; durable (per ``synchronous``) on return."""
        rows = list(rows)
        if rows:
            self._tx(self.synchronous, lambda db: db.executemany(
                "INSERT INTO messages (topic, part, off, key, value) VALUES (?, ?, ?, ?, ?)", rows))

    def commit(self, group: str, offsets: Mapping[tuple[str, int], int],
               trims: Mapping[tuple[str, int], int] | None = None) -> None:
        """Store ``group``'s offsets (never moving one back) and drop, per partition in
        ``trims``, every message below the given offset (consumed by every group)."""
        def work(db: sqlite3.Connection) -> None:
            db.executemany(
                "INSERT INTO commits (grp, topic, part, off) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (grp, topic, part) DO UPDATE SET off = max(off, excluded.off)",
                [(group, t, p, o) for (t, p), o in offsets.items()])
            for (t, p), below in (trims or {}).items():
                db.execute("DELETE FROM messages WHERE topic = ? AND part = ? AND off < ?",
                           (t, p, below))
                db.execute("INSERT INTO starts (topic, part, off) VALUES (?, ?, ?) ON CONFLICT "
                           "(topic, part) DO UPDATE SET off = max(off, excluded.off)",
                           (t, p, below))

        self._tx("NORMAL", work)

    def close(self) -> None:
        with self._mutex:
            if not self._closed:
                self._closed = True
                self._db.close()
