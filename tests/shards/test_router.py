"""Shard routing: the documented hash, bucket maps, and user-id parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shards.backends.sql import ranges_from_bounds
from shards.router import MAX_USER_ID, ShardRouter, bucket_of, default_map, parse_user_id

user_ids = st.integers(min_value=1, max_value=MAX_USER_ID)


def test_hash_is_the_documented_splitmix64() -> None:
    # Known SplitMix64 outputs for seeds 0 and 1 (the generator's first outputs).
    assert bucket_of(0, 2**64) == 0xE220A8397B1DCDAF
    assert bucket_of(1, 2**64) == 0x910A2DEC89025CC1


@given(st.lists(user_ids, min_size=1, max_size=50), st.integers(1, 16))
def test_router_is_stable_and_in_range(uids: list[int], n: int) -> None:
    router = ShardRouter.uniform(n)
    for uid in uids:
        s = router.shard_of(uid)
        assert 0 <= s < n
        assert s == router.shard_of(uid) == default_map(n)[bucket_of(uid)]
    split = router.split(uids)
    assert sorted(u for us in split.values() for u in us) == sorted(uids)
    # with a memo: the same answer, twice, and the memo holds every user's shard
    memo: dict[int, int] = {}
    assert router.split(uids, memo) == split == router.split(uids, memo)
    assert memo == {u: router.shard_of(u) for u in uids}


def test_buckets_spread_evenly() -> None:
    counts = [0] * 4
    router = ShardRouter.uniform(4)
    for uid in range(1, 40_001):
        counts[router.shard_of(uid)] += 1
    assert all(9_000 < c < 11_000 for c in counts), counts


def test_adding_a_shard_moves_whole_buckets_only() -> None:
    # Given a 2-shard map, when buckets 0..99 of shard 0 move to a new shard 2
    old = default_map(2)
    new = [2 if b < 100 else s for b, s in enumerate(old)]
    r_old, r_new = ShardRouter(old, 2), ShardRouter(new, 3)
    # Then only users of the moved buckets change shard
    for uid in range(1, 5000):
        if bucket_of(uid) >= 100:
            assert r_old.shard_of(uid) == r_new.shard_of(uid)
        else:
            assert r_new.shard_of(uid) == 2


def test_bucket_map_must_name_existing_shards() -> None:
    with pytest.raises(ValueError, match="shard 3"):
        ShardRouter([0, 3], 2)


@pytest.mark.parametrize("good,want", [(1, 1), ("42", 42), (MAX_USER_ID, MAX_USER_ID),
                                       (str(MAX_USER_ID), MAX_USER_ID)])
def test_parse_user_id_accepts(good: object, want: int) -> None:
    assert parse_user_id(good) == want


@pytest.mark.parametrize("bad", [0, -1, MAX_USER_ID + 1, "0", "-5", "+5", " 5", "05", "1e3", "",
                                 1.0, True, None, [1], "١٢", str(MAX_USER_ID + 1), "9" * 30])
def test_parse_user_id_refuses(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_user_id(bad)


@given(st.lists(st.integers(2, MAX_USER_ID), max_size=30, unique=True))
def test_ranges_cover_the_key_space_without_gap_or_overlap(bounds: list[int]) -> None:
    ranges = ranges_from_bounds(sorted(bounds))
    assert ranges[0][0] == 1 and ranges[-1][1] == MAX_USER_ID
    for (lo, hi), (nlo, _) in zip(ranges, ranges[1:], strict=False):
        assert lo <= hi and nlo == hi + 1
