"""Turn profiles + rules into state changes (the heart of a nightly run).

For each user the evaluator compares the rules that match now with what matched
before (``user_state``) and emits only *changes*:

* ``enter``: a rule starts matching → a new episode: its banner appears and its
  e-mail goes out once (the ledger keys on user, rule, episode);
* ``exit``: it stops matching → the banner goes; the e-mail re-arms.

A rule that raises or times out on a profile counts as "no match" in the figures
but leaves that user's state for the rule untouched: a buggy rule must not make
banners flicker and e-mails repeat. Rules in the same ``group`` exclude each
other: only the highest-priority match of a group counts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from channels.templates import render_content
from kvadrupel.errors import ChannelError
from rules.context import Context
from rules.ruleset import RuleSet
from rules.service import ActiveRule
from shards.store import ProfileRow

__all__ = ["CompiledPack", "RangeStats", "evaluate_rows"]


class CompiledPack:
    """The active rules compiled into one :class:`RuleSet`, with their metadata."""

    def __init__(self, active: list[ActiveRule], budget_ms: float, generation: Any = None) -> None:
        self.rules = {r.key: r for r in active}
        self.ruleset = RuleSet([r.spec() for r in active], budget_ms=budget_ms)
        self.generation = generation
        # Highest priority first; the first match of a group wins.
        self.order = sorted(active, key=lambda r: (-r.priority, r.key))

    def resolve_groups(self, matched: Iterable[str]) -> list[str]:
        hit = set(matched)
        taken: set[str] = set()
        out = []
        for r in self.order:
            if r.key in hit:
                if r.group:
                    if r.group in taken:
                        continue
                    taken.add(r.group)
                out.append(r.key)
        return out


@dataclass(slots=True)
class RangeStats:
    users: int = 0
    matches: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: dict[str, str] = field(default_factory=dict)
    timeouts: dict[str, int] = field(default_factory=dict)  # rule -> a user id it timed out on
    enters: int = 0
    exits: int = 0

    def merge(self, other: RangeStats) -> None:
        self.users += other.users
        self.matches.update(other.matches)
        self.errors.update(other.errors)
        for k, v in other.error_samples.items():
            self.error_samples.setdefault(k, v)
        self.timeouts.update(other.timeouts)
        self.enters += other.enters
        self.exits += other.exits


def evaluate_rows(
    rows: list[ProfileRow],
    pack: CompiledPack,
    ctx: Context,
    run_id: int | None,
    stats: RangeStats,
) -> tuple[list[dict[str, Any]], list[tuple[int, dict[str, list[Any]]]]]:
    """Evaluate a batch of users. Returns (result messages, new states to save)."""
    results: list[dict[str, Any]] = []
    states: list[tuple[int, dict[str, list[Any]]]] = []
    as_of = ctx.today.isoformat()
    rules = pack.rules
    for row in rows:
        stats.users += 1
        outcome = pack.ruleset.evaluate(row.doc, ctx)
        failed = set(outcome.errors) | set(outcome.timeouts)
        for k, msg in outcome.errors.items():
            stats.errors[k] += 1
            stats.error_samples.setdefault(k, f"user {row.user_id}: {msg}")
        for k in outcome.timeouts:
            stats.errors[k] += 1
            stats.timeouts.setdefault(k, row.user_id)
        matched = pack.resolve_groups(outcome.matched)
        stats.matches.update(matched)
        prev = row.state
        new = dict(prev)
        for key in matched:
            p = prev.get(key)
            if p is not None and p[1]:
                continue
            rule = rules[key]
            episode = (p[0] if p else 0) + 1
            new[key] = [episode, 1, rule.version, as_of]
            results.append(_enter(row, rule, episode, ctx, run_id, stats))
        still = set(matched)
        for key, p in prev.items():
            if p[1] and key not in still and key not in failed:
                new[key] = [p[0], 0, p[2], p[3]]
                stats.exits += 1
                rule = rules.get(key)
                results.append({
                    "kind": "exit", "user_id": row.user_id, "rule": key, "episode": p[0],
                    "version": p[2], "priority": rule.priority if rule else 0, "as_of": as_of,
                    "run_id": run_id,
                })
        if new != prev:
            states.append((row.user_id, new))
    return results, states


def _enter(row: ProfileRow, rule: ActiveRule, episode: int, ctx: Context, run_id: int | None,
           stats: RangeStats) -> dict[str, Any]:
    stats.enters += 1
    banner = email = None
    try:
        banner = render_content(rule.banner, row.doc, ctx)
        email = render_content(rule.email, row.doc, ctx)
    except ChannelError as exc:
        stats.errors[rule.key] += 1
        stats.error_samples.setdefault(rule.key, f"user {row.user_id}: template: {exc}")
    to = row.doc.get("email") if isinstance(row.doc, dict) else None
    return {
        "kind": "enter", "user_id": row.user_id, "rule": rule.key, "episode": episode,
        "version": rule.version, "priority": rule.priority, "as_of": ctx.today.isoformat(),
        "run_id": run_id, "banner": banner,
        "email": (email | {"to": to}) if email and isinstance(to, str) and "@" in to else None,
    }


def as_of_date(value: str | None, default: date) -> date:
    return date.fromisoformat(value) if value else default
