"""The evaluator worker: takes range and user jobs, emits rule results.

Workers form one consumer group on the jobs topic (``kvadrupel evaluate``; start
more to scale out). For a range job a worker

1. claims the range in the control DB (an attempt is counted; a range started
   too often without finishing is parked there instead: scheduler/runs.py);
2. reads the range from its shard in one streaming query (COPY on PostgreSQL),
   evaluates every rule of the run on each user, compares with the user's
   previous state and publishes only the changes (keyed by user id);
3. every ~``FLUSH_USERS`` users waits for the bus to accept what it published and
   only then saves the changed states (one statement): the results of a user are
   durable before the state that says they were sent;
4. marks the range done with its figures, then commits the job's offset.

A worker killed anywhere in there leaves the job uncommitted: after the group
rebalances, its partition's new owner gets the job again and redoes the range.
Users whose state was saved are unchanged now and emit nothing; the others emit
the same changes with the same episode numbers as before, which the ledger and
the banner store absorb: no duplicate e-mail, same banners, and the range's
figures are overwritten, not added.

A range that raises (a shard down) is retried through the bus after a short
backoff and parked after ``range_max_attempts``: the run then ends
``done_with_errors`` instead of hanging.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from engine.bus import Bus, Consumer, Message
from engine.evaluation import CompiledPack, RangeStats, evaluate_rows
from engine.worker import BatchWorker
from kvadrupel import metrics
from kvadrupel.errors import BusError, RuleError, RuleTimeout, ShardUnavailable
from rules.context import Context, make_context
from rules.service import RuleService
from scheduler.runs import RunService
from shards.shardset import ShardSet
from shards.store import ProfileRow, ShardStore

__all__ = ["EvaluatorWorker", "worker_id"]

log = logging.getLogger("kvadrupel.evaluate")

SCAN_BATCH = 256  # rows per evaluated batch: small batches stay in the CPU caches
FLUSH_USERS = 20_000  # users between "bus flushed, states saved" points
PROGRESS_S = 1.0  # how often a running range reports its users (live progress)
TIMEOUT_CONFIRMATIONS = 1  # re-runs that must all overrun before a rule is quarantined


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _rows(store: ShardStore, scan: str, *args: Any) -> Iterator[Any]:
    """The store's tuple scan where it has one, else its ProfileRow stream."""
    fn = getattr(store, scan, None)
    if fn is not None:
        return fn(*args)
    return getattr(store, "stream_" + scan.removeprefix("scan_"))(*args)


class EvaluatorWorker(BatchWorker):
    name = "evaluate"
    # One job at a time, committed when done: a range is seconds of work, and a
    # worker that held several would make the others idle at the end of a run and
    # redo them all after a crash.
    poll_max = 1

    def __init__(self, consumer: Consumer, bus: Bus, shards: ShardSet, rules: RuleService,
                 runs: RunService, *, budget_ms: float = 50.0, batch_budget_ms: float = 1000.0,
                 timezone: str = "Europe/Moscow",
                 error_rate: float = 0.5, error_min_samples: int = 100,
                 today: Callable[[], date] | None = None, retry_backoff_s: float = 1.0) -> None:
        super().__init__(consumer)
        self.bus = bus
        self.shards = shards
        self.rules = rules
        self.runs = runs
        self.budget_ms = budget_ms
        self.batch_budget_ms = batch_budget_ms
        self.timezone = timezone
        self.error_rate = error_rate
        self.error_min_samples = error_min_samples
        self.retry_backoff_s = retry_backoff_s
        self.results_topic = bus.topic("results")
        self.jobs_topic = bus.topic("jobs")
        self.worker = worker_id()
        self._today = today or (lambda: datetime.now(ZoneInfo(timezone)).date())
        self._packs: dict[frozenset[str] | None, CompiledPack] = {}
        self._generation: Any = None
        self._frozen: frozenset[str] = frozenset()
        self._checked = 0.0
        self._stop = threading.Event()

    # -- rules ----------------------------------------------------------------
    def pack(self, only: Iterable[str] | None = None, force: bool = False) -> CompiledPack:
        """The compiled rules (all active ones, or the ``only`` ones), reloaded when
        any rule changes (checked at most once a second)."""
        now = time.monotonic()
        if force or now - self._checked > 1.0:
            self._checked = now
            gen = self.rules.generation()
            if force or gen != self._generation:
                self._generation = gen
                self._packs.clear()
                self._frozen = frozenset(r["key"] for r in self.rules.list()
                                         if r["status"] == "quarantined")
        key = frozenset(only) if only is not None else None
        pack = self._packs.get(key)
        if pack is None:
            pack = self._packs[key] = CompiledPack(self.rules.active(), self.budget_ms,
                                                   self._generation, only=key, frozen=self._frozen,
                                                   batch_budget_ms=self.batch_budget_ms)
        return pack

    # -- the loop -------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        if threading.current_thread() is threading.main_thread():
            # A worker process (``kvadrupel evaluate``) allocates a profile's worth of
            # small dicts per user and frees them a batch later: with the default
            # thresholds the cyclic GC would scan them again and again. Start-up
            # objects are frozen out of its way. (Not done for a worker thread inside
            # another process: that process's GC is not ours to tune.)
            gc.freeze()
            gc.set_threshold(50_000, 20, 100)
        super().run(stop)

    def step(self) -> int:
        try:
            return super().step()
        except BusError:
            batch = self._batch
            if batch and not {(m.topic, m.partition) for m in batch} <= set(
                self.consumer.assignment()
            ):
                # The group rebalanced while we worked (the commit was refused): the
                # partition's new owner got the job again and will find it done, or
                # redo it idempotently. Retrying it here would fail for ever.
                log.warning("lost partition of job %s/%d@%d during a rebalance",
                            batch[0].topic, batch[0].partition, batch[0].offset)
                self._batch = None
                return 0
            raise

    def process(self, batch: list[Message]) -> None:
        for msg in batch:
            try:
                job = orjson.loads(msg.value)
                kind = job["type"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                log.error(
                    "dropping malformed job at %s/%d@%d", msg.topic, msg.partition, msg.offset
                )
                continue
            if kind == "range":
                self.run_range(job)
            elif kind == "users":
                self.run_users(job)
            else:
                log.error("dropping job of unknown type %r", kind)

    # -- jobs -----------------------------------------------------------------
    def run_range(self, job: dict) -> None:
        run_id, no = int(job["run_id"]), int(job["range_no"])
        attempt = self.runs.claim(run_id, no, self.worker)
        if attempt is None:
            return  # done already (a redelivered job), parked, or just parked
        t0 = time.perf_counter()
        try:
            store = self.shards.stores[int(job["shard"])]
            as_of = date.fromisoformat(job["as_of"])
            only = job.get("rules")
            stats = self._evaluate(
                _rows(store, "scan_range", int(job["lo"]), int(job["hi"]), SCAN_BATCH),
                store, as_of, run_id, only, progress=(run_id, no))
        except BusError:
            # Not the range's fault: give the attempt back and let the worker loop
            # retry the job once the bus is back.
            self.runs.release(run_id, no, self.worker)
            raise
        except Exception as exc:  # noqa: BLE001 - the range fails, the worker goes on
            error = f"{type(exc).__name__}: {exc}"
            log.warning("range %d/%d attempt %d failed: %s", run_id, no, attempt, error,
                        exc_info=attempt == 1 and not isinstance(exc, ShardUnavailable))
            if self.runs.range_failed(run_id, no, error):
                # Retry through the bus (another worker may take it) after a pause,
                # so a shard that blinks is not burnt through all attempts at once.
                self._stop.wait(self.retry_backoff_s * 2 ** (attempt - 1))
                self.bus.publish(self.jobs_topic, orjson.dumps(job), key=f"{run_id}:{no}".encode())
                self.bus.flush()
            return
        seconds = time.perf_counter() - t0
        self.runs.range_done(run_id, no, stats.users, dict(stats.matches), dict(stats.errors),
                             enters=stats.enters, exits=stats.exits, seconds=seconds,
                             worker=self.worker, rule_cpu=dict(stats.cpu))
        log.info("range %d/%d done: %d users in %.2fs (%.0f users/s), %d enters, %d exits",
                 run_id, no, stats.users, seconds, stats.users / seconds if seconds else 0,
                 stats.enters, stats.exits)

    def run_users(self, job: dict) -> None:
        store = self.shards.stores[int(job["shard"])]
        as_of = date.fromisoformat(job["as_of"]) if job.get("as_of") else self._today()
        self._evaluate(_rows(store, "scan_users", [int(u) for u in job["user_ids"]]),
                       store, as_of, None, None)

    def _evaluate(self, chunks: Iterator[Any], store: ShardStore, as_of: date,
                  run_id: int | None, only: Iterable[str] | None,
                  progress: tuple[int, int] | None = None) -> RangeStats:
        total = RangeStats()
        ctx = make_context(as_of, self.timezone)
        publish = self.bus.publish
        topic = self.results_topic
        dumps = orjson.dumps
        pending: list[tuple[int, dict[str, list[Any]]]] = []
        since_flush = 0
        beat = time.monotonic()
        label = "range" if run_id is not None else "users"
        for chunk in chunks:
            rows: list[Any] = chunk if isinstance(chunk, list) else list(chunk)
            while rows:
                pack = self.pack(only)
                stats = RangeStats()
                results, states = evaluate_rows(rows, pack, ctx, run_id, stats)
                evaluated, rows = rows, rows[stats.users:] if stats.slow or stats.timeouts else []
                for r in results:
                    publish(topic, dumps(r), key=str(r["user_id"]).encode())
                    metrics.EVAL_CHANGES.labels(r["rule"], r["kind"]).inc()
                pending += states
                since_flush += stats.users
                if since_flush >= FLUSH_USERS:
                    self._save(store, pending)
                    pending = []
                    since_flush = 0
                total.merge(stats)
                metrics.EVAL_USERS.labels(label).inc(stats.users)
                for key, n in stats.errors.items():
                    metrics.EVAL_ERRORS.labels(key).inc(n)
                for key, seconds in stats.cpu.items():
                    metrics.RULE_CPU.labels(key).inc(seconds)
                if stats.errors or stats.slow:  # (a timeout counts as an error)
                    self._police(total, pack, ctx, evaluated[:stats.users])
                if progress is not None and time.monotonic() - beat >= PROGRESS_S:
                    beat = time.monotonic()
                    self.runs.progress(progress[0], progress[1], self.worker, total.users)
        self._save(store, pending)
        return total

    def _save(self, store: ShardStore, states: list[tuple[int, dict[str, list[Any]]]]) -> None:
        # Results first (flush: durably accepted by the bus), then the state that
        # records them: a crash in between re-emits, it never loses.
        self.bus.flush()
        if states:
            store.save_state(states)

    def _police(self, stats: RangeStats, pack: CompiledPack, ctx: Context, rows: list[Any]) -> None:
        """Quarantine rules that spend the batch budget, time out, or fail on too many
        profiles. ``rows``: the batch just evaluated."""
        changed = False
        for key, uid in stats.slow.items():
            rule = pack.rules.get(key)
            if rule and self._too_slow(pack, key, rows, ctx):
                self.rules.quarantine(
                    key, rule.version,
                    f"used over {self.batch_budget_ms:g} ms of CPU on one batch of "
                    f"{len(rows)} profiles (the batch budget)", uid)
                changed = True
            stats.timeouts.pop(key, None)  # its interrupt was the batch budget's
        for key, uid in stats.timeouts.items():
            rule = pack.rules.get(key)
            if rule and self._times_out(pack, key, stats.timeout_docs.get(key), ctx):
                self.rules.quarantine(
                    key, rule.version, f"exceeded the {self.budget_ms:g} ms budget", uid
                )
                changed = True
        if stats.users >= self.error_min_samples:
            for key, n in stats.errors.items():
                rule = pack.rules.get(key)
                if rule and key not in stats.timeouts and key not in stats.slow \
                        and n / stats.users > self.error_rate:
                    sample = stats.error_samples.get(key, "")
                    self.rules.quarantine(
                        key,
                        rule.version,
                        f"error rate {n}/{stats.users} over {self.error_rate:.0%}: {sample}",
                        None,
                    )
                    changed = True
        stats.timeouts.clear()
        stats.timeout_docs.clear()
        stats.slow.clear()
        if changed:
            self.pack(force=True)

    def _alone(self, pack: CompiledPack, key: str, ctx: Context) -> tuple[Any, Context]:
        compiled = pack.ruleset.compiled[pack.ruleset.keys.index(key)]
        return compiled, replace(ctx, rule_key=key, rule_version=pack.rules[key].version)

    def _times_out(self, pack: CompiledPack, key: str, doc: Any, ctx: Context) -> bool:
        """Confirm a timeout before quarantining: the budget is the thread's CPU time,
        which includes a garbage collection the rule happened to trigger. The rule
        runs again, alone, on the same profile, with the collector off; only a rule
        that overruns every time is taken out."""
        compiled, rule_ctx = self._alone(pack, key, ctx)
        with _collector_off():
            for _ in range(TIMEOUT_CONFIRMATIONS):
                try:
                    compiled.match(doc, rule_ctx)
                except RuleTimeout:
                    continue
                except RuleError:
                    pass  # it raised instead: an error, counted already
                log.warning(
                    "rule %s overran its budget once but not when re-run: not quarantined", key
                )
                return False
        return True

    def _too_slow(self, pack: CompiledPack, key: str, rows: list[Any], ctx: Context) -> bool:
        """Confirm a batch-budget overrun: the charge is sampled (rules/budget.py) and
        a long garbage collection may land on any rule. Runs the rule alone over the
        same rows, timing its CPU: confirmed once it has used half the budget (the
        charge is right give or take a tick or two; a collection charged to a
        healthy rule is off by orders of magnitude). Costs at most half a budget."""
        compiled, rule_ctx = self._alone(pack, key, ctx)
        budget_s = self.batch_budget_ms / 1000.0 / 2
        spent = 0.0
        with _collector_off():
            for row in rows:
                doc = row.doc if isinstance(row, ProfileRow) else row[1]
                t0 = time.thread_time()
                try:
                    compiled.match(doc, rule_ctx)
                except RuleError:
                    pass
                spent += time.thread_time() - t0
                if spent >= budget_s:
                    return True
        log.warning("rule %s was charged its batch budget but used %.0f ms when re-run alone: "
                    "not quarantined", key, spent * 1000)
        return False


@contextlib.contextmanager
def _collector_off() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
