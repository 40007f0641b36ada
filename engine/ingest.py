"""The ingest worker: events → per-user aggregation → one write per user per shard.

Per batch: parse and validate every message (bad ones go to the dead-letter topic
with the cause and the original bytes), group the events by shard, and let each
shard apply its users' events in order inside one transaction together with its
high-water marks (``ShardStore.ingest``), shards in parallel. Then ask for an
immediate re-evaluation of the users whose profile changed, and only then commit
the offsets. A crash anywhere redelivers the batch; the marks make the replay a
no-op for shards that had already committed.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import orjson

from engine.bus import Bus, Consumer, Message
from engine.events import apply_events, parse_event
from engine.worker import BatchWorker
from kvadrupel import metrics
from kvadrupel.errors import EventError
from shards.shardset import ShardSet
from shards.store import IngestItem

__all__ = ["IngestWorker", "dead_letter"]

log = logging.getLogger("kvadrupel.ingest")


def dead_letter(bus: Bus, topic: str, msg: Message | None, cause: str, original: bytes,
                event_id: str | None = None) -> None:
    try:
        text: Any = original.decode()
        encoding = "utf-8"
    except UnicodeDecodeError:
        text = base64.b64encode(original).decode()
        encoding = "base64"
    record = {
        "cause": cause,
        "event_id": event_id,
        "source": {"topic": msg.topic, "partition": msg.partition, "offset": msg.offset} if msg else None,
        "original": text,
        "encoding": encoding,
    }
    bus.publish(topic, orjson.dumps(record), key=msg.key if msg else None)


class IngestWorker(BatchWorker):
    name = "ingest"

    def __init__(self, consumer: Consumer, bus: Bus, shards: ShardSet, *, max_bytes: int,
                 batch_max: int = 5000, batch_ms: int = 50,
                 on_changed: Callable[[list[int]], None] | None = None) -> None:
        super().__init__(consumer)
        self.bus = bus
        self.shards = shards
        self.poll_max = batch_max
        self.poll_timeout = batch_ms / 1000
        self.apply = partial(apply_events, max_bytes=max_bytes)
        self.on_changed = on_changed
        self.dlq = bus.topic("events.dlq")
        self.jobs = bus.topic("jobs")
        self.pool = ThreadPoolExecutor(max_workers=max(1, len(shards)), thread_name_prefix="ingest-shard")
        self.dead_lettered = 0

    def process(self, batch: list[Message]) -> None:
        metrics.INGEST_BATCH.observe(len(batch))
        per_shard: dict[int, list[IngestItem]] = {}
        raw_by_id: dict[str, tuple[Message, bytes]] = {}
        for msg in batch:
            try:
                ev = parse_event(msg.value)
            except EventError as exc:
                dead_letter(self.bus, self.dlq, msg, exc.reason, msg.value)
                self.dead_lettered += 1
                metrics.INGEST_EVENTS.labels("invalid").inc()
                continue
            raw_by_id[ev.event_id] = (msg, msg.value)
            item = IngestItem(ev.user_id, ev, msg.topic, msg.partition, msg.offset)
            per_shard.setdefault(self.shards.router.shard_of(ev.user_id), []).append(item)
        futures = {
            s: self.pool.submit(self.shards.stores[s].ingest, items, self.apply)
            for s, items in per_shard.items()
        }
        # Wait for every shard before raising, so a retry replays against known marks.
        outcomes = {}
        errors = []
        for s, fut in futures.items():
            try:
                outcomes[s] = fut.result()
            except Exception as exc:  # noqa: BLE001 - re-raised below after all shards finish
                errors.append(exc)
        if errors:
            raise errors[0]
        changed: list[int] = []
        for out in outcomes.values():
            for ev, reason in out.rejected:
                msg, raw = raw_by_id[ev.event_id]
                dead_letter(self.bus, self.dlq, msg, reason, raw, ev.event_id)
                self.dead_lettered += 1
                metrics.INGEST_EVENTS.labels("rejected").inc()
            metrics.INGEST_EVENTS.labels("applied").inc(out.applied)
            metrics.INGEST_EVENTS.labels("replayed").inc(out.skipped)
            # Users whose events were skipped as already applied are re-evaluated too:
            # the crash that caused the replay may have lost their evaluation request.
            changed += out.changed if not out.skipped else out.touched
        if changed:
            self.request_evaluation(changed)
        self.bus.flush()

    def request_evaluation(self, user_ids: list[int]) -> None:
        by_shard = self.shards.router.split(user_ids)
        for shard, uids in by_shard.items():
            for i in range(0, len(uids), 500):
                chunk = uids[i : i + 500]
                job = {"type": "users", "shard": shard, "user_ids": chunk}
                self.bus.publish(self.jobs, orjson.dumps(job), key=str(chunk[0]).encode())
        if self.on_changed:
            self.on_changed(user_ids)

    def close(self) -> None:
        super().close()
        self.pool.shutdown(wait=False)
