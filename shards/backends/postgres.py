"""Production shard store: one PostgreSQL database per shard (psycopg 3).

Overrides the portable code where PostgreSQL has a faster form: the nightly
evaluation's reads (COPY), state writes (unnest) and range planning from the
planner's statistics instead of counting rows (all in pg_stream.py), and ingest
(pg_ingest.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import date
from typing import Any

import orjson
import psycopg
from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import OperationalError

from shards.backends import pg_stream
from shards.backends.pg_ingest import PgIngestMixin
from shards.backends.sql import SqlShardStore, json_dumps, ranges_from_bounds
from shards.store import ScanRow, StateWrite

__all__ = ["PostgresShardStore", "postgres_engine"]


def postgres_engine(url: str, pool_size: int = 5) -> Engine:
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=5,
        pool_pre_ping=True,
        json_serializer=json_dumps,
        json_deserializer=orjson.loads,
        connect_args={"connect_timeout": 5},
    )


class PostgresShardStore(PgIngestMixin, SqlShardStore):  # ingest: see pg_ingest.py
    @classmethod
    def from_url(cls, index: int, url: str, replica_url: str | None = None) -> PostgresShardStore:
        primary = postgres_engine(url)
        return cls(index, primary, postgres_engine(replica_url) if replica_url else None)

    # -- the nightly evaluation (pg_stream.py): COPY reads, unnest state writes --
    # Evaluation reads the primary, not a replica: the state it diffs against must
    # be the one it (and the ingest-triggered re-evaluations) last wrote.
    def scan_range(self, lo: int, hi: int, batch: int = 2000,
                   due_on: date | None = None) -> Iterator[list[ScanRow]]:
        try:
            yield from pg_stream.scan_range(self.engine, lo, hi, batch, due_on)
        except (OperationalError, psycopg.OperationalError) as exc:
            raise self._unavailable(exc) from exc

    def scan_users(self, user_ids: Sequence[int], batch: int = 2000) -> Iterator[list[ScanRow]]:
        try:
            yield from pg_stream.scan_users(self.engine, user_ids, batch)
        except (OperationalError, psycopg.OperationalError) as exc:
            raise self._unavailable(exc) from exc

    def scan_range_text(self, lo: int, hi: int, batch: int = 2000,
                        due_on: date | None = None) -> Iterator[list[bytes]]:
        try:
            yield from pg_stream.scan_range_text(self.engine, lo, hi, batch, due_on)
        except (OperationalError, psycopg.OperationalError) as exc:
            raise self._unavailable(exc) from exc

    def scan_users_text(self, user_ids: Sequence[int], batch: int = 2000) -> Iterator[list[bytes]]:
        try:
            yield from pg_stream.scan_users_text(self.engine, user_ids, batch)
        except (OperationalError, psycopg.OperationalError) as exc:
            raise self._unavailable(exc) from exc

    def save_state(self, states: Sequence[tuple[int, dict[str, list[Any]]] | StateWrite],
                   *, merge_wake: bool = False) -> None:
        try:
            pg_stream.save_states(self.engine, states, merge_wake)
        except (OperationalError, psycopg.OperationalError) as exc:
            raise self._unavailable(exc) from exc

    def plan_ranges(self, target_users: int) -> list[tuple[int, int]]:
        try:
            with self.engine.connect() as conn:
                bounds, _ = pg_stream.plan_bounds(conn, target_users)
                conn.commit()
        except OperationalError as exc:
            raise self._unavailable(exc) from exc
        return ranges_from_bounds(bounds)
