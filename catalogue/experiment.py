"""The experiment report of one rule: ``GET /v1/rules/{key}/experiment``.

Counts come from every shard's ``goal_exposures`` (channels/goals.py): per arm
and content variant, the users with an episode of the rule (exposed) and those of
them whose goal held within the window after an episode started (converted).

The comparison (catalogue/experiment_stats.py :func:`analyse`): each treated arm
(one per variant where the rule has variants) against the *untreated* users —
the rule's holdout and the installation's global control group pooled, as
neither is sent anything by the rule. Rates with Wilson score intervals, the
absolute uplift with Newcombe's hybrid score interval, the relative uplift with
the Katz log interval, all 95 %; the sample-ratio-mismatch check is Pearson's
χ² of the exposed counts against the shares the configuration expects (global
control first, then the rule's holdout of the rest; variants share the treated
users evenly), flagged below p = 0.001. ``by_arm`` keeps the holdout and control
arms apart, each with its Wilson interval.

Engagement: impressions and clicks (``banner_stats``) belong to the treated arm
by construction — the other arms are shown no banner — so theirs are 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine, func, select

from catalogue.experiment_stats import MIN_USERS, Arm, analyse, wilson
from channels.goals import experiment_counts
from channels.holdouts import get_control_share
from rules.goals import goal_window
from shards.schema import banner_stats

__all__ = ["experiment_report"]


def _engagement(control: Engine, key: str) -> dict[str, int]:
    with control.connect() as conn:
        row = conn.execute(select(func.coalesce(func.sum(banner_stats.c.impressions), 0),
                                  func.coalesce(func.sum(banner_stats.c.clicks), 0))
                           .where(banner_stats.c.rule_key == key)).one()
    return {"impressions": int(row[0]), "clicks": int(row[1])}


def experiment_report(rule: dict[str, Any], control: Engine, stores: Sequence[Any],
                      min_users: int = MIN_USERS) -> dict[str, Any]:
    """The report of ``rule`` (a :meth:`RuleService.get` row) over ``stores``."""
    key = rule["key"]
    counts = experiment_counts(stores, key)
    holdout = float(rule.get("holdout") or 0.0)
    share = get_control_share(control)
    # Expected shares of users (the hash assigns the global group first).
    w_control = share / 100.0
    w_holdout = (1.0 - w_control) * holdout / 100.0
    w_treated = 1.0 - w_control - w_holdout

    def total(arm: str) -> tuple[int, int]:
        xs = [v for (a, _), v in counts.items() if a == arm]
        return sum(x for x, _ in xs), sum(c for _, c in xs)

    variants = sorted({v for (a, v) in counts if a == "treatment"}, key=lambda v: (v is None, v))
    by_arm = []
    for arm in ("treatment", "holdout", "control"):
        exposed, converted = total(arm)
        ci = wilson(converted, exposed) if exposed else None
        by_arm.append({"arm": arm, "exposed": exposed, "converted": converted,
                       "rate": converted / exposed if exposed else None,
                       "ci": None if ci is None else [ci.low, ci.high]})
    engagement = _engagement(control, key)
    treated_ctr = (engagement["clicks"] / engagement["impressions"]
                   if engagement["impressions"] else None)
    out: dict[str, Any] = {
        "rule": key,
        "version": rule.get("version"),
        "goal": {"window_days": goal_window(rule.get("source") or "")},
        "holdout": holdout,
        "control_group": share,
        "by_arm": by_arm,
        "engagement": {
            "treatment": {**engagement, "ctr": treated_ctr},
            "holdout": {"impressions": 0, "clicks": 0, "ctr": None},
            "control": {"impressions": 0, "clicks": 0, "ctr": None},
        },
    }
    untreated = [total("holdout"), total("control")]
    base_exposed = sum(x for x, _ in untreated)
    base_converted = sum(c for _, c in untreated)
    treated = [(v, counts.get(("treatment", v), (0, 0))) for v in variants]
    if out["goal"]["window_days"] is None:
        out["verdict"] = "The rule has no goal: there are no conversions to compare."
        out["analysis"] = None
    elif base_exposed == 0 or not any(x for _, (x, _) in treated):
        out["verdict"] = ("No comparison yet: the rule needs users in the treated arm and in "
                          "the holdout or the global control group"
                          + ("" if w_holdout or w_control else
                             " (set a holdout share on the rule)") + ".")
        out["analysis"] = None
    else:
        arms = [Arm("untreated", base_exposed, base_converted, w_holdout + w_control,
                    control=True)]
        per = w_treated / max(1, len(treated))
        arms += [Arm("treatment", x, c, per, variant=v) for v, (x, c) in treated]
        report = analyse(arms, min_users=min_users).to_dict()
        out["analysis"] = report
        out["verdict"] = report["verdict"]
    return out
