"""Alembic environment for the control database(s).

``kvadrupel migrate`` opens each database itself and hands the connection over in
``config.attributes["connection"]`` (Alembic cookbook, "Sharing a Connection"), so
one script directory serves every shard. Run from the ``alembic`` CLI, the URL
comes from ``-x url=...``.
"""

from alembic import context
from sqlalchemy import create_engine

from shards.migrations.runner import run_locked
from shards.schema import control_metadata

config = context.config
target_metadata = control_metadata


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_locked(context, connection, target_metadata)
        return
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit("give the database URL: alembic -n control -x url=... upgrade head")
    with create_engine(url).connect() as conn:
        run_locked(context, conn, target_metadata)


run()
