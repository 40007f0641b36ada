"""All shards of a deployment behind the router, plus the control database."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Engine, select
from sqlalchemy.dialects import postgresql, sqlite

from shards.backends.postgres import PostgresShardStore, postgres_engine
from shards.backends.sql import SqlShardStore
from shards.backends.sqlite import SqliteShardStore, sqlite_engine
from shards.router import ShardRouter, default_map
from shards.schema import shard_map
from shards.store import ShardStore

__all__ = ["ShardSet", "control_engine", "open_shard", "load_router"]


def open_shard(index: int, url: str, replica_url: str | None = None) -> SqlShardStore:
    if url.startswith("sqlite"):
        return SqliteShardStore.from_url(index, url)
    if url.startswith("postgresql"):
        return PostgresShardStore.from_url(index, url, replica_url)
    raise ValueError(f"shard {index}: unsupported database URL scheme in {url.split(':', 1)[0]!r}")


def control_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        return sqlite_engine(url, immediate=True)
    if url.startswith("postgresql"):
        return postgres_engine(url)
    raise ValueError(f"control DB: unsupported database URL scheme {url.split(':', 1)[0]!r}")


def load_router(control: Engine, n_shards: int, buckets: int = 1024) -> ShardRouter:
    """Read the bucket map; the first start writes the default contiguous map."""
    query = select(shard_map.c.bucket, shard_map.c.shard).order_by(shard_map.c.bucket)
    with control.begin() as conn:
        rows = conn.execute(query).all()
        if not rows:
            # Processes starting together race to write the first map: insert with
            # ON CONFLICT DO NOTHING and read back whatever won.
            mapping = default_map(n_shards, buckets)
            ins = (postgresql.insert(shard_map) if control.dialect.name == "postgresql"
                   else sqlite.insert(shard_map)).on_conflict_do_nothing()
            conn.execute(ins, [{"bucket": b, "shard": s} for b, s in enumerate(mapping)])
            rows = conn.execute(query).all()
    return ShardRouter([r.shard for r in rows], n_shards)


class ShardSet:
    def __init__(self, router: ShardRouter, stores: Sequence[ShardStore]) -> None:
        if router.n_shards != len(stores):
            raise ValueError(f"router knows {router.n_shards} shards, {len(stores)} configured")
        self.router = router
        self.stores = list(stores)

    def __len__(self) -> int:
        return len(self.stores)

    def for_user(self, user_id: int) -> ShardStore:
        return self.stores[self.router.shard_of(user_id)]

    def close(self) -> None:
        for s in self.stores:
            s.close()
