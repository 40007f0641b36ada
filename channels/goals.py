"""Exposures and conversions of rules' experiments (rules/goals.py), per shard.

The delivery worker records in the user's shard (``goal_exposures``) every
episode that starts — real or ghost — with its arm (channels/holdouts.py) and
variant, and, for each :class:`~engine.messages.Convert` the evaluator emits, the
first date on which the rule's goal held within the window: an UPDATE of a row
whose ``converted_on`` is still empty, so a user converts at most once per
episode however often the goal is seen to hold (nightly runs, ingest
re-evaluations, redelivered messages). A conversion for an episode with no
exposure row (started before goals were tracked) counts nothing.

:func:`experiment_counts` adds the counts of every shard up per arm and variant.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from sqlalchemy import and_, bindparam, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from shards.schema import goal_exposures

__all__ = ["Conversion", "Exposure", "experiment_counts", "record_conversions",
           "record_exposures"]


@dataclass(frozen=True, slots=True)
class Exposure:
    rule_key: str
    user_id: int
    episode: int
    version: int
    arm: str  # treatment | holdout | control
    started_on: date
    variant: str | None = None


@dataclass(frozen=True, slots=True)
class Conversion:
    rule_key: str
    user_id: int
    episode: int
    started_on: date
    on: date


def record_exposures(store: Any, rows: Sequence[Exposure]) -> None:
    """Insert the exposures; one already recorded (a redelivered enter) is kept as is."""
    if not rows:
        return
    pg = store.engine.dialect.name == "postgresql"
    stmt = (postgresql.insert if pg else sqlite.insert)(goal_exposures).on_conflict_do_nothing(
        index_elements=["rule_key", "user_id", "episode"])
    with store.engine.begin() as conn:
        conn.execute(stmt, [{"rule_key": x.rule_key, "user_id": x.user_id, "episode": x.episode,
                             "version": x.version, "arm": x.arm, "variant": x.variant,
                             "started_on": x.started_on, "converted_on": None} for x in rows])


def record_conversions(store: Any, rows: Sequence[Conversion]) -> int:
    """Mark each episode converted on the earliest date given for it, unless it was
    already; returns how many episodes converted now."""
    if not rows:
        return 0
    first: dict[tuple[str, int, int], Conversion] = {}
    for c in rows:
        k = (c.rule_key, c.user_id, c.episode)
        if k not in first or c.on < first[k].on:
            first[k] = c
    stmt = update(goal_exposures).where(and_(
        goal_exposures.c.rule_key == bindparam("r"), goal_exposures.c.user_id == bindparam("u"),
        goal_exposures.c.episode == bindparam("e"),
        goal_exposures.c.started_on == bindparam("s"),
        goal_exposures.c.converted_on.is_(None),
    )).values(converted_on=bindparam("on"))
    n = 0
    with store.engine.begin() as conn:
        for c in first.values():  # one by one: the row count says which converted now
            n += conn.execute(stmt, {"r": c.rule_key, "u": c.user_id, "e": c.episode,
                                     "s": c.started_on, "on": c.on}).rowcount or 0
    return n


def experiment_counts(stores: Sequence[Any], rule_key: str
                      ) -> dict[tuple[str, str | None], tuple[int, int]]:
    """(arm, variant) -> (users exposed, users converted) of ``rule_key`` over every
    shard. A user is counted once per arm and variant (exposed: any episode there;
    converted: any of those episodes converted)."""
    t = goal_exposures.c
    per_user = (select(t.arm, t.variant, t.user_id,
                       func.max(t.converted_on).label("conv"))
                .where(t.rule_key == rule_key)
                .group_by(t.arm, t.variant, t.user_id).subquery())
    q = (select(per_user.c.arm, per_user.c.variant, func.count(),
                func.count(per_user.c.conv))
         .group_by(per_user.c.arm, per_user.c.variant))
    exposed: Counter[tuple[str, str | None]] = Counter()
    converted: Counter[tuple[str, str | None]] = Counter()
    for store in stores:
        with store.engine.connect() as conn:
            for arm, variant, n, c in conn.execute(q):
                exposed[(arm, variant)] += int(n)
                converted[(arm, variant)] += int(c)
    return {k: (exposed[k], converted[k]) for k in exposed}
