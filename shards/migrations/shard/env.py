"""Alembic environment for the shard database(s).

``kvadrupel migrate`` opens each database itself and hands the connection over in
``config.attributes["connection"]`` (Alembic cookbook, "Sharing a Connection"), so
one script directory serves every shard. Run from the ``alembic`` CLI, the URL
comes from ``-x url=...``.
"""

from alembic import context

from shards.migrations.runner import run_env
from shards.schema import shard_metadata

run_env(context, "shard", shard_metadata)
