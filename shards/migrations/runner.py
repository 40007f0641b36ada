"""Run Alembic migrations on every shard and on the control database.

Safe to re-run: Alembic records the revision in each database. On PostgreSQL the
upgrade takes an advisory lock (two ``kvadrupel migrate`` at once wait for each
other instead of racing) and sets ``lock_timeout`` so a migration never queues
forever behind a long transaction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, text

HERE = Path(__file__).parent
_LOCK_ID = 0x6B76_7164  # "kvqd"


def alembic_config(kind: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE / kind))
    return cfg


def run_locked(context: Any, connection: Connection, metadata: Any) -> None:
    pg = connection.dialect.name == "postgresql"
    if pg:
        connection.execute(text("SET lock_timeout = '10s'"))
        connection.execute(text(f"SELECT pg_advisory_lock({_LOCK_ID})"))
    try:
        context.configure(connection=connection, target_metadata=metadata,
                          render_as_batch=not pg)
        with context.begin_transaction():
            context.run_migrations()
    finally:
        if pg:
            connection.execute(text(f"SELECT pg_advisory_unlock({_LOCK_ID})"))
            connection.commit()


def run_env(context: Any, kind: str, metadata: Any) -> None:
    """The body of both ``env.py`` files: use the connection ``kvadrupel migrate``
    handed over, or the ``-x url=...`` of the alembic CLI."""
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run_locked(context, connection, metadata)
        return
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit(f"give the database URL: alembic -n {kind} -x url=... upgrade head")
    with create_engine(url).connect() as conn:
        run_locked(context, conn, metadata)


def upgrade(kind: str, engine: Engine, revision: str = "head") -> None:
    cfg = alembic_config(kind)
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        conn.commit()


def current(kind: str, engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
