"""Content variants: which of a rule's variants a user gets, fixed by the hash.

A rule version may carry 2–10 variants (rules/models.py ``VariantSpec``), each with a
key, a weight and its own banner (with its push) and/or e-mail. A user's variant is

    pick_weighted(bucket(salt + "/variant", user_id), [weights...])

(base/buckets.py): the 10,000 buckets are cut into consecutive slices in the order the
variants are listed, each ``round(cumulative weight / total × 10,000)`` wide, and the
user gets the variant whose slice holds their bucket. The salt is the rule's salt (its
key unless an analyst reshuffles it); the ``"/variant"`` suffix makes the variant
independent of the holdout (hashed with the bare salt) and of the global control group.
The answer is a pure function of (salt, weights, user id): the same for banner, e-mail
and push, in every process, across restarts.

The evaluator picks the variant when it renders an enter's content
(engine/evaluate/compose.py) and the result carries its key to the delivery worker,
which records it in the banner row, the episode (ghost episodes too: the variant a
held-out user *would* have got), the ledger row's payload and — through the banner
JSON the portal echoes back — the engagement counts.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from base.buckets import BUCKETS, bucket, pick_weighted

__all__ = ["VARIANT_SUFFIX", "content_of", "variant_of", "variant_salt"]

VARIANT_SUFFIX = "/variant"


def variant_salt(salt: str) -> str:
    return salt + VARIANT_SUFFIX


@lru_cache(maxsize=1024)
def _edges(weights: tuple[float, ...]) -> tuple[int, ...] | None:
    """The slices' upper bucket edges (``pick_weighted``'s, computed once per weights);
    None where ``pick_weighted`` must decide (a weight ≤ 0: never a validated rule)."""
    if not weights or any(w <= 0 for w in weights):
        return None
    total, edge, out = float(sum(weights)), 0.0, []
    for w in weights:
        edge += w
        out.append(round(edge / total * BUCKETS))
    return tuple(out)


def variant_of(user_id: int, salt: str, variants: Sequence[Mapping[str, Any]]) -> int | None:
    """The index of the user's variant, or None when the rule has none: exactly
    ``pick_weighted(bucket(salt + "/variant", user_id), weights)``."""
    if not variants:
        return None
    weights = tuple(float(v.get("weight") or 0) for v in variants)
    b = bucket(variant_salt(salt), user_id)
    edges = _edges(weights)
    if edges is None:
        return pick_weighted(b, weights)
    return min(bisect_right(edges, b), len(edges) - 1)


def content_of(rule: Any, user_id: int | None) -> tuple[
        Mapping[str, Any] | None, Mapping[str, Any] | None, str | None]:
    """``(banner spec, e-mail spec, variant key)`` for this user of ``rule`` (an
    ``ActiveRule``): the variant's parts over the rule's own."""
    variants = getattr(rule, "variants", None)
    if not variants or user_id is None:
        return rule.banner, rule.email, None
    i = variant_of(user_id, getattr(rule, "salt", None) or rule.key, variants)
    assert i is not None
    v = variants[i]
    return v.get("banner") or rule.banner, v.get("email") or rule.email, str(v["key"])
