"""The documented assignment (base/buckets.py): its formula, its spread and its stability."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter

import pytest

from base.buckets import BUCKETS, bucket, in_share, pick_weighted


def test_bucket_is_the_documented_formula() -> None:
    # Given the formula in the module docstring, computed here independently
    for salt, uid in [("x", 1), ("licence-expiring", 60_000_000), ("a/variant", "42")]:
        digest = hashlib.sha256(f"{salt}:{uid}".encode()).digest()
        # Then bucket() gives the same answer
        assert bucket(salt, uid) == int.from_bytes(digest[:8], "big") % BUCKETS
    assert bucket("x", 1) == 3646  # the published test vector
    assert bucket("x", 1) == bucket("x", "1")


def test_buckets_spread_evenly() -> None:
    # 200k ids over 100 groups of 100 buckets: a chi-square test at p = 0.001 (df 99: 148.2)
    n, groups = 200_000, 100
    counts = Counter(bucket("spread", uid) * groups // BUCKETS for uid in range(n))
    expected = n / groups
    chi2 = sum((counts.get(g, 0) - expected) ** 2 / expected for g in range(groups))
    assert chi2 < 148.2, chi2


def test_salts_are_independent() -> None:
    held_a = {u for u in range(20_000) if in_share(bucket("rule-a", u), 10)}
    held_b = {u for u in range(20_000) if in_share(bucket("rule-b", u), 10)}
    # about 2,000 each, and about 10 % of rule a's holdout is in rule b's (not all, not none)
    assert 1_800 < len(held_a) < 2_200
    assert 120 < len(held_a & held_b) < 290


def test_bucket_is_the_same_in_another_process() -> None:
    code = "from base.buckets import bucket; print([bucket('r', u) for u in range(50)])"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == str([bucket("r", u) for u in range(50)])


def test_a_share_grows_without_moving_anyone_out() -> None:
    for b in range(BUCKETS):
        if in_share(b, 5):
            assert in_share(b, 10)
    assert sum(in_share(b, 5) for b in range(BUCKETS)) == 500
    assert not any(in_share(b, 0) for b in range(BUCKETS))


def test_pick_weighted_follows_the_weights() -> None:
    picks = Counter(pick_weighted(b, [1, 0, 3]) for b in range(BUCKETS))
    assert picks == {0: 2_500, 2: 7_500}  # the zero weight is never picked
    assert pick_weighted(BUCKETS - 1, [1, 1, 0]) == 1


@pytest.mark.parametrize("weights", [[0, 0], [], [1, -1, 1]])
def test_pick_weighted_refuses_bad_weights(weights: list[float]) -> None:
    with pytest.raises(ValueError, match="weights"):
        pick_weighted(0, weights)
