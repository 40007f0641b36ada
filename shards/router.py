"""User id → virtual bucket → physical shard.

The hash is fixed and documented so any client can route on its own:

    bucket(user_id) = splitmix64(user_id) mod BUCKETS          (BUCKETS = 1024)

where ``splitmix64`` is the finaliser of Steele et al.'s SplitMix64 generator
(the 64-bit mixer also used by Java's ``SplittableRandom``)::

    z = (x + 0x9E3779B97F4A7C15) mod 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) mod 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) mod 2**64
    z ^ (z >> 31)

Buckets are mapped to shards by a table (``shard_map`` in the control database),
initialised as contiguous blocks: bucket b → shard ``b * n_shards // BUCKETS``.
Adding a shard later moves whole buckets: reassign some buckets in the map and
copy their users; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["MAX_USER_ID", "ShardRouter", "bucket_of", "default_map", "parse_user_id"]

MAX_USER_ID = 2**63 - 1
_M64 = 0xFFFFFFFFFFFFFFFF


def _splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def bucket_of(user_id: int, buckets: int = 1024) -> int:
    return _splitmix64(user_id) % buckets


def default_map(n_shards: int, buckets: int = 1024) -> list[int]:
    return [b * n_shards // buckets for b in range(buckets)]


def parse_user_id(value: object) -> int:
    """A positive 64-bit user id from a JSON number or a decimal string.

    Raises ``ValueError`` with the reason otherwise (bools, floats, signs,
    whitespace and leading zeros are refused: ids are identifiers, not numbers).
    """
    if isinstance(value, bool):
        raise ValueError("user id must be an integer, not a boolean")
    if isinstance(value, int):
        uid = value
    elif isinstance(value, str):
        if not value.isascii() or not value.isdigit() or (len(value) > 1 and value[0] == "0"):
            raise ValueError("user id must be a decimal string of digits without leading zeros")
        if len(value) > 19:
            raise ValueError("user id must be at most 2**63-1")
        uid = int(value)
    else:
        raise ValueError("user id must be an integer or a decimal string")
    if not 0 < uid <= MAX_USER_ID:
        raise ValueError("user id must be between 1 and 2**63-1")
    return uid


class ShardRouter:
    def __init__(self, bucket_map: Sequence[int], n_shards: int) -> None:
        if not bucket_map:
            raise ValueError("empty bucket map")
        bad = [s for s in bucket_map if not 0 <= s < n_shards]
        if bad:
            raise ValueError(f"bucket map names shard {bad[0]} but there are {n_shards} shards")
        self.bucket_map = list(bucket_map)
        self.buckets = len(bucket_map)
        self.n_shards = n_shards

    @classmethod
    def uniform(cls, n_shards: int, buckets: int = 1024) -> ShardRouter:
        return cls(default_map(n_shards, buckets), n_shards)

    def shard_of(self, user_id: int) -> int:
        return self.bucket_map[_splitmix64(user_id) % self.buckets]

    def split(self, user_ids: Iterable[int],
              memo: dict[int, int] | None = None) -> dict[int, list[int]]:
        """``shard -> user ids`` in the given order. ``memo``: user -> shard answers of
        this router to look up first and add to (hashing an id costs ~1 µs)."""
        out: dict[int, list[int]] = {}
        shard_of = self.shard_of
        for uid in user_ids:
            if memo is None:
                s = shard_of(uid)
            else:
                known = memo.get(uid)
                if known is None:
                    s = memo[uid] = shard_of(uid)
                else:
                    s = known
            out.setdefault(s, []).append(uid)
        return out
