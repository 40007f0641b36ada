"""Alembic environment for the control database(s).

``kvadrupel migrate`` opens each database itself and hands the connection over in
``config.attributes["connection"]`` (Alembic cookbook, "Sharing a Connection"), so
one script directory serves every shard. Run from the ``alembic`` CLI, the URL
comes from ``-x url=...``.
"""

from alembic import context

from shards.migrations.runner import run_env
from shards.schema import control_metadata

run_env(context, "control", control_metadata)
