"""Shard store implementations: ``sqlite`` (embedded) and ``postgres`` (production)."""
