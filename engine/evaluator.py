"""The evaluator worker: takes range and user jobs, emits rule results.

For a job it streams the users' profiles with their previous state, evaluates
every active rule, publishes the changes (keyed by user id) to the results topic,
waits for the bus to accept them, and only then saves the new state and marks
the range done. A crash before the state is saved makes the redo emit the same
changes with the same episode numbers, which the ledger and the banner store
absorb: no duplicate e-mail, same banners.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from datetime import date, datetime
from zoneinfo import ZoneInfo

import orjson

from engine.bus import Bus, Consumer, Message
from engine.evaluation import CompiledPack, RangeStats, evaluate_rows
from engine.worker import BatchWorker
from kvadrupel import metrics
from rules.context import make_context
from rules.service import RuleService
from scheduler.runs import RunService
from shards.shardset import ShardSet
from shards.store import ProfileRow

__all__ = ["EvaluatorWorker"]

log = logging.getLogger("kvadrupel.evaluate")


class EvaluatorWorker(BatchWorker):
    name = "evaluate"
    poll_max = 20

    def __init__(self, consumer: Consumer, bus: Bus, shards: ShardSet, rules: RuleService,
                 runs: RunService, *, budget_ms: float = 50.0, timezone: str = "Europe/Moscow",
                 error_rate: float = 0.5, error_min_samples: int = 100,
                 today: Callable[[], date] | None = None) -> None:
        super().__init__(consumer)
        self.bus = bus
        self.shards = shards
        self.rules = rules
        self.runs = runs
        self.budget_ms = budget_ms
        self.timezone = timezone
        self.error_rate = error_rate
        self.error_min_samples = error_min_samples
        self.results_topic = bus.topic("results")
        self.jobs_topic = bus.topic("jobs")
        self._today = today or (lambda: datetime.now(ZoneInfo(timezone)).date())
        self._pack: CompiledPack | None = None
        self._checked = 0.0

    # -- rules ----------------------------------------------------------------
    def pack(self, force: bool = False) -> CompiledPack:
        now = time.monotonic()
        if self._pack is None or force or now - self._checked > 1.0:
            self._checked = now
            gen = self.rules.generation()
            if self._pack is None or gen != self._pack.generation:
                self._pack = CompiledPack(self.rules.active(), self.budget_ms, gen)
        return self._pack

    # -- jobs -----------------------------------------------------------------
    def process(self, batch: list[Message]) -> None:
        for msg in batch:
            try:
                job = orjson.loads(msg.value)
                kind = job["type"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                log.error("dropping malformed job at %s/%d@%d", msg.topic, msg.partition, msg.offset)
                continue
            if kind == "range":
                self.run_range(job)
            elif kind == "users":
                self.run_users(job)
            else:
                log.error("dropping job of unknown type %r", kind)

    def run_range(self, job: dict) -> None:
        run_id, no = int(job["run_id"]), int(job["range_no"])
        if self.runs.range_status(run_id, no) != "pending":
            return  # done already (a redelivered job) or parked
        store = self.shards.stores[int(job["shard"])]
        as_of = date.fromisoformat(job["as_of"])
        try:
            stats = self._evaluate(store.stream_range(int(job["lo"]), int(job["hi"])), store, as_of, run_id)
        except Exception as exc:
            # Retry the range through the bus (another worker may take it); park it
            # after too many attempts so the run finishes "with errors", not hangs.
            if self.runs.range_failed(run_id, no, f"{type(exc).__name__}: {exc}"):
                self.bus.publish(self.jobs_topic, orjson.dumps(job), key=f"{run_id}:{no}".encode())
                self.bus.flush()
            log.exception("range %d/%d failed", run_id, no)
            return
        self.runs.range_done(run_id, no, stats.users, dict(stats.matches), dict(stats.errors))

    def run_users(self, job: dict) -> None:
        store = self.shards.stores[int(job["shard"])]
        as_of = date.fromisoformat(job["as_of"]) if job.get("as_of") else self._today()
        self._evaluate(store.stream_users([int(u) for u in job["user_ids"]]), store, as_of, None)

    def _evaluate(self, chunks: Iterator[list[ProfileRow]], store, as_of: date,
                  run_id: int | None) -> RangeStats:
        total = RangeStats()
        ctx = make_context(as_of, self.timezone)
        for rows in chunks:
            pack = self.pack()
            stats = RangeStats()
            results, states = evaluate_rows(rows, pack, ctx, run_id, stats)
            for r in results:
                self.bus.publish(self.results_topic, orjson.dumps(r), key=str(r["user_id"]).encode())
            self.bus.flush()
            store.save_state(states)
            total.merge(stats)
            metrics.EVAL_USERS.labels("range" if run_id is not None else "users").inc(stats.users)
            for r in results:
                metrics.EVAL_CHANGES.labels(r["rule"], r["kind"]).inc()
            for key, n in stats.errors.items():
                metrics.EVAL_ERRORS.labels(key).inc(n)
            self._police(total, pack)
        return total

    def _police(self, stats: RangeStats, pack: CompiledPack) -> None:
        """Quarantine rules that time out, or fail on too many profiles."""
        changed = False
        for key, uid in stats.timeouts.items():
            rule = pack.rules.get(key)
            if rule:
                self.rules.quarantine(key, rule.version, f"exceeded the {self.budget_ms:g} ms budget", uid)
                changed = True
        if stats.users >= self.error_min_samples:
            for key, n in stats.errors.items():
                rule = pack.rules.get(key)
                if rule and key not in stats.timeouts and n / stats.users > self.error_rate:
                    sample = stats.error_samples.get(key, "")
                    self.rules.quarantine(key, rule.version,
                                          f"error rate {n}/{stats.users} over {self.error_rate:.0%}: {sample}",
                                          None)
                    changed = True
        if changed:
            stats.timeouts.clear()
            self.pack(force=True)
