"""The evaluator worker: takes range and user jobs, emits rule results.

Workers form one consumer group on the jobs topic (``kvadrupel evaluate``; start
more to scale out). For a range job a worker

1. claims the range in the control DB (an attempt is counted; a range started
   too often without finishing is parked there instead: engine/runs.py);
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

import gc
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from base import metrics
from base.errors import BusError, SandboxCrash, ShardUnavailable
from catalogue.service import RuleService
from engine.batch import BatchWorker
from engine.bus import Bus, Consumer, Message
from engine.evaluate.evaluation import RangeStats, StateOut
from engine.messages import (
    Enter,
    Exit,
    MessageError,
    RangeJob,
    Result,
    UsersJob,
    dead_letter,
    decode_answer,
    decode_job,
    encode,
)
from engine.runs import RunService
from rules.isolation import SandboxPool
from rules.readset import affected, read_set
from rules.remote import CHILD_MODULE
from rules.ruleset import ActiveRule
from shards.copytext import row_user
from shards.shardset import ShardSet
from shards.store import ShardStore, StateWrite

__all__ = ["EvaluatorWorker", "worker_id"]

log = logging.getLogger("kvadrupel.evaluate")

SCAN_BATCH = 256  # rows per evaluated batch: small batches stay in the CPU caches
FLUSH_USERS = 20_000  # users between "bus flushed, states saved" points
PROGRESS_S = 1.0  # how often a running range reports its users (live progress)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True, slots=True)
class PackInfo:
    """The rules a batch is evaluated with, as the evaluator knows them: metadata
    only. The code is compiled and run in the sandbox child (engine/evaluate/child.py),
    which gets ``payload`` once per child under the cache key ``id``."""

    id: str
    rules: dict[str, ActiveRule]
    restricted: bool
    payload: dict[str, Any]

    @classmethod
    def build(cls, active: list[ActiveRule], generation: Any, only: frozenset[str] | None,
              frozen: frozenset[str], budget_ms: float, batch_budget_ms: float) -> PackInfo:
        chosen = [r for r in active if only is None or r.key in only]
        payload = {
            "rules": [r.to_list() for r in active],
            "only": sorted(only) if only is not None else None, "frozen": sorted(frozen),
            "budget_ms": budget_ms, "batch_budget_ms": batch_budget_ms,
        }
        digest = hashlib.sha256(orjson.dumps([str(generation), payload], default=str))
        return cls("pack:" + digest.hexdigest()[:32], {r.key: r for r in chosen},
                   only is not None, payload)


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
                 today: Callable[[], date] | None = None, retry_backoff_s: float = 1.0,
                 sandbox: SandboxPool | None = None) -> None:
        super().__init__(consumer)
        # Rule code runs only in the sandbox's child processes (rules/isolation.py).
        self.sandbox = sandbox or SandboxPool(CHILD_MODULE, size=1)
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
        self._packs: dict[frozenset[str] | None, PackInfo] = {}
        self._generation: Any = None
        self._frozen: frozenset[str] = frozenset()
        self._checked = 0.0
        self._stop = threading.Event()
        self._reads: dict[tuple[str, int], frozenset[str] | None] = {}

    # -- rules ----------------------------------------------------------------
    def pack(self, only: Iterable[str] | None = None, force: bool = False) -> PackInfo:
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
            pack = self._packs[key] = PackInfo.build(
                self.rules.active(), self._generation, key, self._frozen, self.budget_ms,
                self.batch_budget_ms)
        return pack

    # -- the loop -------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        self.sandbox.warm(1)  # the first job should not wait for a child to start
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
                job = decode_job(msg.value)
            except MessageError as exc:
                log.error("dead-lettering job at %s/%d@%d: %s", msg.topic, msg.partition,
                          msg.offset, exc)
                source = {"topic": msg.topic, "partition": msg.partition, "offset": msg.offset}
                self.bus.publish(self.bus.topic("jobs.dlq"), dead_letter(str(exc), msg.value,
                                                                          source), key=msg.key)
                self.bus.flush()
                continue
            if isinstance(job, RangeJob):
                self.run_range(job)
            else:
                self.run_users(job)

    # -- jobs -----------------------------------------------------------------
    def run_range(self, job: RangeJob) -> None:
        run_id, no = job.run_id, job.range_no
        attempt = self.runs.claim(run_id, no, self.worker)
        if attempt is None:
            return  # done already (a redelivered job), parked, or just parked
        # A range evaluates the rules as they are now (one query per range): a run
        # started right after a rule or its canary changed must not use the pack of
        # a second ago, or it would record as covered what it did not evaluate.
        self._checked = float("-inf")
        t0 = time.perf_counter()
        try:
            stats, swept, mismatches = self._run_passes(job)
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
                self.bus.publish(self.jobs_topic, encode(job), key=f"{run_id}:{no}".encode())
                self.bus.flush()
            return
        seconds = time.perf_counter() - t0
        self.runs.range_done(run_id, no, stats.users, dict(stats.matches), dict(stats.errors),
                             enters=stats.enters, exits=stats.exits, seconds=seconds,
                             worker=self.worker, rule_cpu=dict(stats.cpu), swept=swept,
                             mismatches=mismatches)
        log.info("range %d/%d done: %d users in %.2fs (%.0f users/s), %d enters, %d exits",
                 run_id, no, stats.users, seconds, stats.users / seconds if seconds else 0,
                 stats.enters, stats.exits)

    def _run_passes(self, job: RangeJob) -> tuple[RangeStats, int, int]:
        """The passes of a range job: ``(stats of the main pass, users swept,
        mismatches)``. full: every user. due: the sweep rules over every user
        (their horizons merged into the index), then the users due with every rule.
        verify: due, then every user again — an answer that changes then was missed
        by the incremental nights: counted, logged and corrected (the changes go
        out like any other)."""
        run_id, no = job.run_id, job.range_no
        store = self.shards.stores[job.shard]
        as_of = date.fromisoformat(job.as_of)
        progress = (run_id, no)
        if job.mode not in ("due", "verify"):
            stats = self._evaluate(store.scan_range_text(job.lo, job.hi, SCAN_BATCH), store,
                                   as_of, run_id, job.rules, progress=progress,
                                   merge_wake=job.rules is not None)
            return stats, 0, 0
        sweep = RangeStats()
        if job.sweep:
            keys = self._with_groups(self.pack(), job.sweep)
            sweep = self._evaluate(store.scan_range_text(job.lo, job.hi, SCAN_BATCH), store,
                                   as_of, run_id, keys, merge_wake=True)
        stats = self._evaluate(store.scan_range_text(job.lo, job.hi, SCAN_BATCH, due_on=as_of),
                               store, as_of, run_id, None, progress=progress)
        stats.merge(sweep)  # the sweep's changes and figures; its users are counted apart
        stats.users -= sweep.users
        mismatches = 0
        if job.mode == "verify":
            check = self._evaluate(store.scan_range_text(job.lo, job.hi, SCAN_BATCH), store,
                                   as_of, run_id, None)
            mismatches = check.enters + check.exits
            stats.enters += check.enters
            stats.exits += check.exits
            if mismatches:
                metrics.EVAL_MISMATCHES.inc(mismatches)
                log.error("range %d/%d: the verifying pass found %d answers the incremental "
                          "nights missed (corrected: their changes were published)",
                          run_id, no, mismatches)
        return stats, sweep.users, mismatches

    def run_users(self, job: UsersJob) -> None:
        """Re-evaluate users after ingest changed them: for each user only the rules
        whose read-set meets the paths its events changed (rules/readset.py), every
        rule for a user never evaluated or whose changes are not known."""
        store = self.shards.stores[job.shard]
        as_of = date.fromisoformat(job.as_of) if job.as_of else self._today()
        if job.paths is None or len(job.paths) != len(job.user_ids):
            self._evaluate(store.scan_users_text(job.user_ids, SCAN_BATCH),
                           store, as_of, None, None)
            return
        changed = dict(zip(job.user_ids, job.paths, strict=True))
        pack = self.pack()
        reads = self._read_sets(pack)
        for lines in store.scan_users_text(job.user_ids, SCAN_BATCH):
            groups: dict[frozenset[str] | None, list[bytes]] = {}
            for line in lines:
                paths = changed.get(row_user(line))
                if paths is None or line.endswith(b"\t\\N\n"):  # not known / no state
                    keys: frozenset[str] | None = None
                else:
                    keys = self._with_groups(
                        pack, [k for k, r in reads.items() if affected(r, paths)])
                    if len(keys) == len(reads):
                        keys = None
                    elif not keys:
                        metrics.EVAL_USERS.labels("unaffected").inc()
                        continue  # no rule reads what changed: no answer can change
                groups.setdefault(keys, []).append(line)
            for keys, group in groups.items():
                self._evaluate(iter([group]), store, as_of, None, keys,
                               merge_wake=keys is not None)

    @staticmethod
    def _with_groups(pack: PackInfo, keys: Iterable[str]) -> frozenset[str]:
        """``keys`` and every active rule that shares a group with one of them: a rule
        of a group decides with the others which one shows (the highest priority
        wins), so they are evaluated together."""
        out = set(keys)
        groups = {pack.rules[k].group for k in out if k in pack.rules} - {None}
        if groups:
            out |= {k for k, r in pack.rules.items() if r.group in groups}
        return frozenset(out)

    def _read_sets(self, pack: PackInfo) -> dict[str, frozenset[str] | None]:
        out = {}
        for key, rule in pack.rules.items():
            k = (key, rule.version)
            if k not in self._reads:
                self._reads[k] = read_set(rule.source)
            out[key] = self._reads[k]
        return out

    def _evaluate(self, chunks: Iterator[list[bytes]], store: ShardStore, as_of: date,
                  run_id: int | None, only: Iterable[str] | None,
                  progress: tuple[int, int] | None = None,
                  merge_wake: bool = False) -> RangeStats:
        """Evaluate the rows; publish the changes; save every user's state with its
        place in the wake-up index (``merge_wake``: only some rules were evaluated,
        keep the earlier of the stored and the new date)."""
        total = RangeStats()
        ctx = [as_of.isoformat(), self.timezone]
        publish = self.bus.publish
        topic = self.results_topic
        pending: list[StateWrite] = []
        since_flush = 0
        beat = time.monotonic()
        label = "range" if run_id is not None else "users"
        for chunk in chunks:
            lines = chunk
            while lines:
                pack = self.pack(only)
                try:
                    stats, results, states = self._eval_batch(pack, lines, ctx, run_id)
                except SandboxCrash as crash:
                    self._contain(pack, lines, ctx, crash)
                    continue  # the same rows again, without the rule that crashed
                stopped = stats.slow or stats.timeouts  # the batch stopped early: go on after
                evaluated, lines = lines, lines[stats.users:] if stopped else []
                for r in results:
                    publish(topic, encode(r), key=str(r.user_id).encode())
                    kind = ("enter" if type(r) is Enter else "exit" if type(r) is Exit
                            else "goal")
                    metrics.EVAL_CHANGES.labels(r.rule, kind).inc()
                pending += [StateWrite(u, s, as_of, _wake_date(w)) for u, s, w in states]
                since_flush += stats.users
                if since_flush >= FLUSH_USERS:
                    self._save(store, pending, merge_wake)
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
        self._save(store, pending, merge_wake)
        return total

    def _eval_batch(self, pack: PackInfo, lines: list[bytes], ctx: list[str], run_id: int | None
                    ) -> tuple[RangeStats, list[Result], list[StateOut]]:
        """Evaluate rows in a sandbox child; check what it sends back (it ran rule code:
        it may only speak for the users and rules it was given)."""
        meta = {"pack": pack.id, "ctx": ctx, "run_id": run_id}
        # CPU the child may use: every rule's batch budget, or per-profile budgets.
        per_rule = self.batch_budget_ms or self.budget_ms * len(lines)
        cpu_s = max(10.0, len(pack.rules) * per_rule / 1000.0 + 5.0)
        out, body = self.sandbox.call("eval", meta, b"".join(lines), cpu_s=cpu_s,
                                      cache=(pack.id, lambda: pack.payload))
        try:
            stats = RangeStats.from_json(out["stats"])
            answer = decode_answer(body)
            users = {row_user(ln) for ln in lines[:stats.users]}
            if not 0 <= stats.users <= len(lines) or not all(
                    r.user_id in users for r in answer.results) or not all(
                    u in users for u, _, _ in answer.states):
                raise ValueError("results for users it was not given")
        except (KeyError, TypeError, ValueError) as exc:  # MessageError is a ValueError
            raise SandboxCrash(f"sent a malformed answer ({exc})") from None
        return stats, answer.results, answer.states

    def _contain(self, pack: PackInfo, lines: list[bytes], ctx: list[str],
                 crash: SandboxCrash) -> None:
        """A child died on a batch: find the rule responsible by running each rule of
        the pack alone over the batch (fresh children replace the ones that die),
        then the first row it dies on. A rule that killed a child twice (the batch,
        then alone) is quarantined with the reason and that user; it does not run
        again until a new version is saved. No rule to blame: the range fails (and
        is retried, then parked: engine/runs.py)."""
        log.error("a sandbox child died on a batch of %d rows: %s; finding the rule",
                  len(lines), crash.reason)
        blamed = False
        for key in sorted(pack.rules):
            alone = self.pack([key])
            try:
                self._eval_batch(alone, lines, ctx, None)
                continue
            except SandboxCrash as again:
                reason = again.reason
            uid = self._first_crashing_row(alone, lines, ctx)
            rule = pack.rules[key]
            self.rules.quarantine(
                key, rule.version, f"killed the rule sandbox process twice: it {reason}", uid)
            log.error("rule %s v%d quarantined: its sandbox process %s (user %s)",
                      key, rule.version, reason, uid)
            blamed = True
        if not blamed:
            raise crash
        self.pack(force=True)

    def _first_crashing_row(self, pack: PackInfo, lines: list[bytes], ctx: list[str]
                            ) -> int | None:
        lo, hi = 0, len(lines)  # the first crashing row is in lines[lo:hi]
        while hi - lo > 1:
            mid = (lo + hi) // 2
            try:
                self._eval_batch(pack, lines[lo:mid], ctx, None)
                lo = mid
            except SandboxCrash:
                hi = mid
        return row_user(lines[lo]) if lines else None

    def _save(self, store: ShardStore, states: list[StateWrite], merge_wake: bool) -> None:
        # Results first (flush: durably accepted by the bus), then the state that
        # records them: a crash in between re-emits, it never loses.
        self.bus.flush()
        if states:
            store.save_state(states, merge_wake=merge_wake)

    def _police(self, stats: RangeStats, pack: PackInfo, ctx: list[str],
                rows: list[bytes]) -> None:
        """Quarantine rules that spend the batch budget, time out, or fail on too many
        profiles. ``rows``: the batch just evaluated. Confirmations run in a child."""
        changed = False
        for key, uid in stats.slow.items():
            rule = pack.rules.get(key)
            if rule and self._confirm("confirm_slow", pack, key, rows, ctx):
                self.rules.quarantine(
                    key, rule.version,
                    f"used over {self.batch_budget_ms:g} ms of CPU on one batch of "
                    f"{len(rows)} profiles (the batch budget)", uid)
                changed = True
            stats.timeouts.pop(key, None)  # its interrupt was the batch budget's
        for key, uid in stats.timeouts.items():
            rule = pack.rules.get(key)
            row = [ln for ln in rows if row_user(ln) == uid][:1]
            if rule and row and self._confirm("confirm_timeout", pack, key, row, ctx):
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

    def _confirm(self, op: str, pack: PackInfo, key: str, rows: list[bytes],
                 ctx: list[str]) -> bool:
        """Re-run ``key`` alone in a child (rules/evaluation.py confirm_*); a child that
        dies on it confirms as surely as an overrun does."""
        meta = {"pack": pack.id, "key": key, "ctx": ctx, "batch_budget_ms": self.batch_budget_ms}
        try:
            out, _ = self.sandbox.call(op, meta, b"".join(rows),
                                       cpu_s=10.0 + self.batch_budget_ms / 1000.0,
                                       cache=(pack.id, lambda: pack.payload))
        except SandboxCrash:
            return True
        return out.get("confirmed") is True


def _wake_date(text: str | None) -> date | None:
    return date.fromisoformat(text) if text is not None else None
