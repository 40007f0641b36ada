"""Storage: shard routing, the shard stores, the control database and migrations."""
