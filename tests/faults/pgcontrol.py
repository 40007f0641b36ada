"""Take a real PostgreSQL shard database down and bring it back (tests only).

``down(url)`` refuses new connections to that one database and ends the open
ones, as if its server were gone; ``up(url)`` allows connections again. The
PostgreSQL server itself keeps running (other tests share it).
"""

from __future__ import annotations

import psycopg

from tests.fixtures.postgres import _ADMIN_DSN


def _name(url: str) -> str:
    return url.rsplit("/", 1)[1]


def down(url: str) -> None:
    name = _name(url)
    with psycopg.connect(_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )


def up(url: str) -> None:
    with psycopg.connect(_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{_name(url)}" ALLOW_CONNECTIONS true')


def execute(url: str, sql: str) -> None:
    with psycopg.connect(
        url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
    ) as conn:
        conn.execute(sql)
