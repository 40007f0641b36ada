"""Embedded shard store: one SQLite file per shard.

SQLite allows one writer at a time. Write transactions start with ``BEGIN
IMMEDIATE`` so a read-then-write transaction takes the write lock up front instead
of failing with SQLITE_BUSY when it upgrades; reads use a second engine with
ordinary deferred transactions so they never queue behind writers (WAL mode).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine, create_engine, event

from shards.backends.sql import SqlShardStore, json_dumps

__all__ = ["SqliteShardStore", "sqlite_engine"]


def sqlite_engine(url: str, *, immediate: bool) -> Engine:
    path = url.split("///", 1)[-1]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"timeout": 30, "check_same_thread": False},
        json_serializer=json_dumps,
        json_deserializer=orjson.loads,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below issue BEGIN itself.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is fsynced. With NORMAL a power cut could roll back the last
        # profile writes while the embedded bus's log (fsynced at every append) still
        # says their events were consumed: those events would be lost.
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class SqliteShardStore(SqlShardStore):
    @classmethod
    def from_url(cls, index: int, url: str) -> SqliteShardStore:
        return cls(index, sqlite_engine(url, immediate=True), sqlite_engine(url, immediate=False))
