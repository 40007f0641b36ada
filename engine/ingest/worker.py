"""The ingest worker: events → per-user aggregation → one write per shard per batch.

Per batch (up to ``batch_max`` messages or ``batch_ms``, whichever comes first):

1. parse and validate every message; an invalid one is set aside for the
   dead-letter topic (cause + original bytes) and never blocks its partition;
2. group the events by shard and hand each shard its part: one transaction per
   shard (``ShardStore.ingest``) applies every user's events in arrival order and
   advances the shard's high-water mark of each (topic, partition) with the same
   commit. Events rejected on the stored profile (path into a non-object, size
   limit) are dead-lettered *inside* that transaction, before it commits: once
   the marks commit, a replay would skip them. Shards are written concurrently,
   one thread per shard, and a shard's batches are written in order;
3. once every shard of the batch has committed: publish the dead letters of step
   1 and one re-evaluation request naming each user whose profile changed, wait
   until the bus has them, and only then commit the Kafka offsets.

While shards write batch N, the worker already parses batch N+1 (``pipeline``
batches in flight at most: ``KVADRUPEL_INGEST_PIPELINE``, 3 by default);
batches complete strictly in order.

A crash anywhere redelivers what was not committed; the marks make the replay a
no-op for shards that had committed it, so every event applies exactly once.
Users of a replayed stretch are re-evaluated (their request may have been lost).
If a shard fails, nothing later is written to it: the worker waits for the
writes in flight, keeps every uncommitted message, pauses the consumer and
retries them in order with backoff (see :class:`~engine.batch.BatchWorker`);
shards that had committed skip them by their marks.

Dead letters are at least once: a crash between publishing them and committing
can repeat one. Each carries its source (topic, partition, offset) as identity.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

from base import metrics
from base.errors import EventError
from engine import messages
from engine.batch import BatchWorker
from engine.bus import Bus, Consumer, Message
from engine.ingest.events import DEFAULT_SEEN_CAP, apply_user
from engine.messages import VERSION, UsersJob, encode
from engine.messages.event import parse_event
from rules.readset import event_paths
from shards.shardset import ShardSet
from shards.store import IngestDataError, IngestItem, IngestOutcome

__all__ = ["IngestWorker", "dead_letter"]

log = logging.getLogger("kvadrupel.ingest")

EVAL_CHUNK = 500  # users per re-evaluation request message
SHARD_MEMO_USERS = 1_000_000  # user -> shard answers an ingest worker remembers
# An IngestItem without the Python-level __new__ of a NamedTuple (one per event).
_new_item = partial(tuple.__new__, IngestItem)


def dead_letter(bus: Bus, topic: str, msg: Message | None, cause: str, original: bytes,
                event_id: str | None = None) -> None:
    """Publish a dead letter (engine/messages.py): the cause, the source coordinates
    (its identity) and the original bytes (UTF-8 text, or base64 when not UTF-8)."""
    source = {"topic": msg.topic, "partition": msg.partition, "offset": msg.offset} if msg else None
    bus.publish(topic, messages.dead_letter(cause, original, source, event_id),
                key=msg.key if msg else None)


GC_INTERVAL_S = 30.0  # the worker runs the cyclic garbage collector this often


def tune_gc() -> None:
    """Take the cyclic garbage collector off the hot path.

    Nearly everything the worker allocates is freed by reference counting (the
    collector found no cycle at all in a 1,000,000-event run); but a batch in
    flight holds ~10^5 young containers (parsed events, items), and every
    automatic young collection walks all of them: ~60 ms per collection, ~20%
    of the worker's CPU even with raised thresholds (bench: 32.6 → 26.4 µs of
    CPU per event without it). So what was allocated at start-up is frozen
    (never scanned again), automatic collection is off, and the worker collects
    itself every :data:`GC_INTERVAL_S` seconds (:meth:`IngestWorker.step`; the
    young generations, and everything every tenth time): the rare cycles (an
    exception and its traceback) still go, at a fraction of the cost.
    """
    gc.collect()
    gc.freeze()
    gc.disable()


class _Halted(Exception):
    """A shard write skipped because an earlier one failed (the stretch is retried)."""


@dataclass(slots=True)
class _Batch:
    messages: list[Message]
    writes: dict[int, Future[IngestOutcome]]  # shard -> its transaction
    invalid: list[tuple[Message, str]]  # failed validation: dead-lettered on completion
    paths: dict[int, set[str]] = field(default_factory=dict)  # user -> paths its events change

    def done(self) -> bool:
        return all(f.done() for f in self.writes.values())


class IngestWorker(BatchWorker):
    name = "ingest"

    def __init__(self, consumer: Consumer, bus: Bus, shards: ShardSet, *, max_bytes: int,
                 batch_max: int = 5000, batch_ms: int = 50, seen_cap: int = DEFAULT_SEEN_CAP,
                 pipeline: int = 2, cache_users: int = 0,
                 on_changed: Callable[[list[int]], None] | None = None) -> None:
        super().__init__(consumer)
        self.bus = bus
        self.shards = shards
        self.poll_max = batch_max
        self.poll_timeout = batch_ms / 1000
        self.max_bytes = max_bytes
        self.depth = max(1, pipeline)
        self.apply = partial(apply_user, max_bytes=max_bytes, seen_cap=seen_cap)
        self.on_changed = on_changed
        self.dlq = bus.topic("events.dlq")
        self.jobs = bus.topic("jobs")
        # One thread per shard: a shard's batches are written in order.
        self.pools = [ThreadPoolExecutor(1, thread_name_prefix=f"ingest-shard{i}")
                      for i in range(len(shards))]
        self.dead_lettered = 0
        self._inflight: deque[_Batch] = deque()
        self._halt = False  # set when a shard write failed: queued writes must not run
        self._next_gc = time.monotonic() + GC_INTERVAL_S
        self._gcs = 0
        self._memo: dict[int, int] = {}
        self._memo_router: object = None
        per_store = cache_users // max(1, len(shards))
        for store in shards.stores:
            store.set_ingest_cache(per_store)

    # -- the loop ------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        tune_gc()
        try:
            super().run(stop)
        finally:
            gc.enable()  # the process may go on without this worker

    def process(self, batch: list[Message]) -> None:
        """One batch on its own, start to commit (BatchWorker's contract; the
        loop itself is :meth:`step`, which keeps ``pipeline`` batches in flight)."""
        self._finish(self._start(batch))

    def step(self) -> int:
        now = time.monotonic()
        if now >= self._next_gc:  # see tune_gc
            self._next_gc = now + GC_INTERVAL_S
            self._gcs += 1
            # What survives a collection is not scanned again until a full one.
            gc.collect(2 if self._gcs % 10 == 0 else 1)
        if self._batch is not None:
            # A failed stretch: retried alone, in order, before anything new.
            batch = self._held(self._batch)
            if not batch:
                self._batch = None
                return 0
            self._batch = batch
            self._halt = False
            handled = self._bisect(batch)
            self._batch = None
            return handled
        handled = 0
        batch = []
        if len(self._inflight) < self.depth:
            wait = self.poll_timeout if not self._inflight else min(self.poll_timeout, 0.005)
            try:
                batch = self.consumer.poll(self.poll_max, wait)
            except Exception:
                # Keep what is in flight for the retry, ahead of anything polled
                # while backing off.
                self._rewind()
                raise
            if batch:
                try:
                    self._inflight.append(self._start(batch))
                except Exception:
                    self._rewind(batch)
                    raise
            elif not self._inflight:
                self.idle()
                return 0
        # Complete the oldest batches: those already written, or the oldest when
        # the pipeline is full or there is nothing new to overlap with.
        while self._inflight and (not batch or len(self._inflight) >= self.depth
                                  or self._inflight[0].done()):
            try:
                handled += self._finish(self._inflight[0])
            except Exception:
                self._rewind()
                raise
            self._inflight.popleft()
        return handled

    def _rewind(self, polled: list[Message] | None = None) -> None:
        """After a failure: stop queued writes, wait for those running, and keep
        every uncommitted message (in order) for the retry."""
        self._halt = True
        kept: list[Message] = []
        for b in self._inflight:
            for f in b.writes.values():
                f.exception()  # waits; the outcome no longer matters
            kept += b.messages
        self._inflight.clear()
        self._batch = kept + (polled or [])

    def _bisect(self, batch: list[Message]) -> int:
        """Process ``batch``; if a shard refuses its data (IngestDataError), split
        it until the message at fault is alone, and dead-letter that message."""
        try:
            return self._finish(self._start(batch))
        except IngestDataError as exc:
            if len(batch) > 1:
                mid = len(batch) // 2
                return self._bisect(batch[:mid]) + self._bisect(batch[mid:])
            [msg] = batch
            log.error("ingest: %s/%d@%d refused by its shard: %s", msg.topic, msg.partition,
                      msg.offset, exc)
            dead_letter(self.bus, self.dlq, msg, f"refused by the shard: {exc}", msg.value)
            self.bus.flush()
            self.dead_lettered += 1
            metrics.INGEST_EVENTS.labels("refused").inc()
            self.consumer.commit(batch)
            self.handled += 1
            return 1

    def drain(self) -> None:
        """Stopping: complete what is in flight (best effort; the rest is redelivered)."""
        try:
            while self._inflight:
                self._finish(self._inflight[0])
                self._inflight.popleft()
        except Exception as exc:  # noqa: BLE001
            log.warning("ingest: in-flight batches left to redelivery at stop (%s)", exc)
            self._rewind()

    # -- one batch -----------------------------------------------------------
    def _start(self, batch: list[Message]) -> _Batch:
        metrics.INGEST_BATCH.observe(len(batch))
        per_shard: dict[int, list[IngestItem]] = {}
        invalid: list[tuple[Message, str]] = []
        paths: dict[int, set[str]] = {}
        known = self._shards_of()
        shard_of = self.shards.router.shard_of
        new_item = _new_item
        max_bytes = self.max_bytes
        for msg in batch:
            try:
                ev = parse_event(msg.value, max_bytes=max_bytes)
            except EventError as exc:
                invalid.append((msg, exc.reason))
                continue
            except Exception as exc:  # noqa: BLE001 - whatever it is, it must not block
                log.exception("ingest: cannot parse %s/%d@%d", msg.topic, msg.partition, msg.offset)
                invalid.append((msg, f"cannot parse: {type(exc).__name__}: {exc}"))
                continue
            uid = ev.user_id
            changes = event_paths({"set": ev.set, "unset": ev.unset, "inc": ev.inc,
                                   "append": ev.append, "max": ev.max, "min": ev.min})
            seen = paths.get(uid)
            if seen is None:
                paths[uid] = set(changes)
            else:
                seen.update(changes)
            item = new_item((uid, ev, msg.topic, msg.partition, msg.offset))
            s = known.get(uid)
            if s is None:
                s = known[uid] = shard_of(uid)
            items = per_shard.get(s)
            if items is None:
                per_shard[s] = [item]
            else:
                items.append(item)
        writes = {s: self.pools[s].submit(self._write, s, items, batch)
                  for s, items in per_shard.items()}
        return _Batch(batch, writes, invalid, paths)

    def _shards_of(self) -> dict[int, int]:
        """``user_id -> shard`` of the users seen lately (hashing a user id costs
        ~1 µs of Python); emptied when the bucket map changes or it grows large."""
        router = self.shards.router
        if router is not self._memo_router or len(self._memo) > SHARD_MEMO_USERS:
            self._memo_router = router
            self._memo = {}
        return self._memo

    def _write(self, shard: int, items: list[IngestItem], batch: list[Message]) -> IngestOutcome:
        if self._halt:
            raise _Halted(f"shard {shard}: an earlier write failed")
        t0 = time.perf_counter()
        out = self.shards.stores[shard].ingest(
            items, self.apply, before_commit=partial(self._dead_letter_rejected, items, batch)
        )
        metrics.SHARD_WRITE.labels(str(shard)).observe(time.perf_counter() - t0)
        return out

    def _dead_letter_rejected(self, items: list[IngestItem], batch: list[Message],
                              out: IngestOutcome) -> None:
        """Inside the shard transaction: the rejected events must be on the DLQ
        before the marks that skip them on a replay commit."""
        if not out.rejected:
            return
        item_of = {id(it.event): it for it in items}
        msg_at = {(m.topic, m.partition, m.offset): m for m in batch}
        # (The flush is per thread: shard threads dead-letter concurrently, each
        # hears only of its own messages.)
        for ev, reason in out.rejected:
            it = item_of[id(ev)]
            msg = msg_at[(it.topic, it.partition, it.offset)]
            dead_letter(self.bus, self.dlq, msg, reason, msg.value, ev.event_id)
        self.bus.flush()
        self.dead_lettered += len(out.rejected)
        metrics.INGEST_EVENTS.labels("rejected").inc(len(out.rejected))

    def _finish(self, b: _Batch) -> int:
        """Wait for the batch's shards; publish, flush, commit. Raises on failure."""
        outcomes: list[IngestOutcome] = []
        error: BaseException | None = None
        for fut in b.writes.values():  # every shard, even after a failure
            try:
                outcomes.append(fut.result())
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                if error is None or isinstance(error, _Halted):
                    error = exc
        if error is not None:
            raise error
        changed: list[int] = []
        unknown: set[int] = set()  # users whose changed paths are not known
        for out in outcomes:
            metrics.INGEST_EVENTS.labels("applied").inc(out.applied)
            metrics.INGEST_EVENTS.labels("replayed").inc(out.skipped)
            # A replayed stretch may have lost its evaluation request: ask again
            # for everyone in it (with every rule: what changed then is not known).
            if out.skipped:
                changed += out.touched
                unknown.update(out.touched)
            else:
                changed += out.changed
        for msg, reason in b.invalid:
            dead_letter(self.bus, self.dlq, msg, reason, msg.value)
        if changed:
            self.request_evaluation(changed, {u: p for u, p in b.paths.items()
                                              if u not in unknown})
        self.bus.flush()
        if b.invalid:
            self.dead_lettered += len(b.invalid)
            metrics.INGEST_EVENTS.labels("invalid").inc(len(b.invalid))
        self.consumer.commit(b.messages)
        self.handled += len(b.messages)
        return len(b.messages)

    def request_evaluation(self, user_ids: list[int],
                           paths: dict[int, set[str]] | None = None) -> None:
        """One ``users`` job per shard and chunk: each user named once per batch, with
        the profile paths its events changed when known (the evaluator re-evaluates
        only the rules that read them: rules/readset.py)."""
        memo = self._shards_of()
        for shard, uids in self.shards.router.split(dict.fromkeys(user_ids), memo).items():
            for i in range(0, len(uids), EVAL_CHUNK):
                chunk = uids[i : i + EVAL_CHUNK]
                changed = None
                if paths is not None:
                    changed = [sorted(paths[u]) if u in paths else None for u in chunk]
                job = UsersJob(v=VERSION, shard=shard, user_ids=chunk, paths=changed)
                self.bus.publish(self.jobs, encode(job), key=str(chunk[0]).encode())
        if self.on_changed:
            self.on_changed(user_ids)

    def close(self) -> None:
        for pool in self.pools:
            pool.shutdown(wait=True)
        super().close()
