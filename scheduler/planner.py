"""Plan a run: split every shard into user ranges and publish one job per range.

Ranges come from each shard's own statistics (``ShardStore.plan_ranges``: on
PostgreSQL the planner's histogram of ``user_id``, no count), are interleaved
across shards (consecutive jobs hit different databases) and are published with
keys that spread them evenly over the jobs topic's partitions
(:mod:`scheduler.placement`). A job is ``{"type": "range", "run_id", "range_no",
"shard", "lo", "hi", "as_of", "rules"}`` (``rules``: the keys a campaign is
restricted to, or null).

The run is recorded before its jobs are published; a planner that dies in between
leaves a run with ``published_at`` unset, which the scheduler re-publishes
(:func:`republish`): jobs are idempotent, so publishing twice is harmless.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date

from engine.bus import Bus
from engine.messages import encode
from engine.runs import PlannedRange, RunService
from scheduler.placement import spread_keys
from shards.shardset import ShardSet

__all__ = ["Scope", "plan", "publish_jobs", "republish", "scope", "start_run"]


def plan(shards: ShardSet, target_users: int) -> list[PlannedRange]:
    """Every shard's ranges of about ``target_users`` users, interleaved by shard."""
    per_shard: list[list[PlannedRange]] = []
    for store in shards.stores:
        bounds = store.plan_ranges(target_users)
        estimate = store.estimate_count()  # the planner's statistics: no count(*) scan
        each = round(estimate / len(bounds)) if bounds else 0
        per_shard.append([PlannedRange(store.index, lo, hi, each) for lo, hi in bounds])
    out: list[PlannedRange] = []
    for i in range(max((len(p) for p in per_shard), default=0)):
        out += [p[i] for p in per_shard if i < len(p)]
    return out


def publish_jobs(bus: Bus, runs: RunService, run_id: int) -> int:
    """Publish the jobs of the run's unfinished ranges; returns how many."""
    jobs = runs.jobs(run_id)
    topic = bus.topic("jobs")
    keys = spread_keys(bus, topic, [f"{run_id}:{j.range_no}" for j in jobs])
    for job, key in zip(jobs, keys, strict=True):
        bus.publish(topic, encode(job), key=key)
    bus.flush()
    runs.mark_published(run_id)
    return len(jobs)


@dataclass(frozen=True, slots=True)
class Scope:
    """Which users a run evaluates (engine/runs.py, the ``mode`` of its jobs)."""

    mode: str  # full | due | verify
    sweep: list[str] | None = None  # rule keys evaluated over every user first
    covers: dict[str, int] | None = None  # the rule versions the run evaluates


def scope(runs: RunService, as_of: date, active: Mapping[str, int] | None, *,
          rules: Sequence[str] | None = None, full: bool = False,
          verify_every_days: int = 7) -> Scope:
    """Evaluate only what can have changed.

    ``active``: the active rules' versions (None: no incremental planning, every
    user). A run restricted to some rules (a campaign) evaluates every user for
    them. Otherwise, after a complete run: the users due in the wake-up index
    (shards/store.py), plus every user for the rules whose version changed since
    that run, appeared or went (a disabled or deleted rule exits where it was
    active). Every ``verify_every_days`` (and with ``full``) the run also
    re-evaluates everyone and counts what the incremental nights missed.
    """
    if active is None or rules is not None:
        return Scope("full")
    covers = dict(active)
    before = runs.last_covers()
    if before is None:
        return Scope("full", None, covers)
    sweep = sorted({k for k, v in covers.items() if before.get(k) != v}
                   | {k for k in before if k not in covers})
    checked = runs.last_full_check()
    verify = full or checked is None or not 0 <= (as_of - checked).days < verify_every_days
    return Scope("verify" if verify else "due", sweep or None, covers)


def start_run(shards: ShardSet, runs: RunService, bus: Bus, as_of: date,
              target_users: int = 50_000, *, rules: Sequence[str] | None = None,
              kind: str = "manual", fire_key: str | None = None,
              active: Mapping[str, int] | None = None, full: bool = False,
              verify_every_days: int = 7) -> int:
    """Record a run with its ranges and publish them to the jobs topic.

    ``rules``: restrict the run to these rule keys (a campaign); ``fire_key``: the
    scheduler's firing, which makes the run at most once (a second call returns
    the first run's id and publishes nothing). ``active`` (the active rules'
    versions) makes the run incremental (:func:`scope`); ``full`` forces a
    verifying pass over everyone.
    """
    ranges = plan(shards, target_users)
    sc = scope(runs, as_of, active, rules=rules, full=full,
               verify_every_days=verify_every_days)
    run_id, created = runs.create(as_of, ranges, kind=kind, rules=rules, fire_key=fire_key,
                                  mode=sc.mode, sweep=sc.sweep, covers=sc.covers)
    if created and ranges:
        publish_jobs(bus, runs, run_id)
    return run_id


def republish(bus: Bus, runs: RunService, older_than_s: float = 60.0) -> list[int]:
    """Publish the jobs of runs whose planner died before publishing them."""
    ids = runs.unpublished(older_than_s)
    for run_id in ids:
        publish_jobs(bus, runs, run_id)
    return ids
