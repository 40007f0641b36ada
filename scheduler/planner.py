"""Plan a run: split every shard into user ranges and publish one job per range."""

from __future__ import annotations

from datetime import date

import orjson

from engine.bus import Bus
from scheduler.runs import RunService
from shards.shardset import ShardSet

__all__ = ["start_run"]


def start_run(shards: ShardSet, runs: RunService, bus: Bus, as_of: date,
              target_users: int = 50_000) -> int:
    """Record a run with its ranges and publish them to the jobs topic."""
    ranges: list[tuple[int, int, int]] = []
    for store in shards.stores:
        ranges += [(store.index, lo, hi) for lo, hi in store.plan_ranges(target_users)]
    run_id = runs.create(as_of, ranges)
    topic = bus.topic("jobs")
    for no, (shard, lo, hi) in enumerate(ranges):
        job = {"type": "range", "run_id": run_id, "range_no": no, "shard": shard,
               "lo": lo, "hi": hi, "as_of": as_of.isoformat()}
        bus.publish(topic, orjson.dumps(job), key=f"{run_id}:{no}".encode())
    bus.flush()
    return run_id
