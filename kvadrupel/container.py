"""Build every backend once, from settings, and hand them to whoever needs them.

Nothing connects at import time: processes (the API's lifespan, a worker's main,
the demo) create one :class:`Container`, pass its parts in, and close it at exit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from base.clock import Clock
from base.errors import ConfigError
from catalogue.service import RuleService
from channels.holdouts import Arms
from channels.ledger import Ledger
from channels.mail import Mailer
from channels.unsubscribe import Unsubscriber
from engine.bus import Bus
from engine.buses.memory import MemoryBus
from engine.deliver.worker import DeliveryWorker
from engine.evaluate.worker import EvaluatorWorker
from engine.ingest.worker import IngestWorker
from engine.runs import RunService
from kvadrupel import __version__, ops
from kvadrupel.factories import (
    authenticator_from_settings,
    delivery_channel_parts,
    kafka_bus_from_settings,
    mailer_from_settings,
    unsubscriber_from_settings,
)
from kvadrupel.settings import Settings
from rules.isolation import Limits, SandboxPool
from rules.remote import CHILD_MODULE, RuleRunner
from shards.migrations import runner
from shards.shardset import ShardSet, control_engine, load_router, open_shard

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from api.auth import Authenticator

__all__ = ["Container"]

@dataclass
class _SharedBus:
    bus: MemoryBus
    users: int = 0  # containers using it


# Embedded durable buses open in this process, by log path.
# The log's file lock admits one bus per file, and in embedded mode every part of
# the process must see the same queue, so containers on one data dir share it.
_shared_buses: dict[str, _SharedBus] = {}
_shared_lock = threading.Lock()


@dataclass
class Container:
    """Every backend and service of one process, built lazily from ``settings``.

    It is what the web layer is given (``api.services.Services``: the attributes and
    methods below that the API uses)."""

    settings: Settings
    bus_override: Bus | None = None
    clock: Clock = None  # type: ignore[assignment]  # None: built from settings
    _closers: list[Callable[[], object]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.clock is None:
            s = self.settings
            self.clock = Clock(s.timezone, start=s.clock_start)

    # -- storage --------------------------------------------------------------
    @cached_property
    def control(self) -> Engine:
        try:
            return control_engine(self.settings.control_url())
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    @cached_property
    def shards(self) -> ShardSet:
        urls = self.settings.shard_urls()
        replicas = self.settings.shard_replicas
        if replicas and len(replicas) != len(urls):
            raise ConfigError(
                f"KVADRUPEL_SHARD_REPLICAS has {len(replicas)} URLs for {len(urls)} shards"
            )
        try:
            stores = [
                open_shard(i, u, replicas[i] if replicas else None) for i, u in enumerate(urls)
            ]
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        router = load_router(self.control, len(stores), self.settings.buckets)
        return ShardSet(router, stores)

    def migrate(self) -> None:
        """Bring the control DB and every shard to the latest schema (idempotent)."""
        runner.upgrade("control", self.control)
        for url in self.settings.shard_urls():
            store = open_shard(0, url)
            try:
                runner.upgrade("shard", store.engine)
            finally:
                store.close()

    # -- services -------------------------------------------------------------
    @cached_property
    def sandbox(self) -> SandboxPool:
        """The child processes every piece of rule code of this process runs in."""
        s = self.settings
        return SandboxPool(CHILD_MODULE, Limits(memory_mb=s.sandbox_memory_mb),
                           size=s.sandbox_children)

    @cached_property
    def rules(self) -> RuleService:
        return RuleService(self.control, self.settings.timezone, self.settings.rule_budget_ms,
                           shards=lambda: self.shards, clock=self.clock,
                           runner=RuleRunner(self.sandbox, self.settings.rule_budget_ms))

    @cached_property
    def runs(self) -> RunService:
        return RunService(self.control, self.settings.range_max_attempts, clock=self.clock)

    @cached_property
    def ledger(self) -> Ledger:
        s = self.settings
        return Ledger(self.control, s.delivery_max_attempts, s.delivery_retry_base_s,
                      s.delivery_retry_max_s, claim_timeout_s=s.delivery_claim_timeout_s,
                      clock=self.clock.now)

    @cached_property
    def arms(self) -> Arms:
        """Holdouts and the global control group (channels/holdouts.py)."""
        return Arms(self.control, self.settings.control_group_refresh_s)

    @cached_property
    def bus(self) -> Bus:
        if self.bus_override is not None:
            return self.bus_override
        s = self.settings
        if s.embedded_bus and s.bus_durable:
            bus: Bus = self._shared_bus()
        elif s.embedded_bus:
            bus = MemoryBus(s.kafka_topic_prefix, partitions=4)
        else:
            bus = kafka_bus_from_settings(s)
        bus.ensure_topics(bus.topics.values(), s.kafka_partitions)
        return bus

    def _shared_bus(self) -> MemoryBus:
        s = self.settings
        path = str((s.data_dir / "bus.db").resolve())
        with _shared_lock:
            entry = _shared_buses.get(path)
            if entry is None or entry.bus.prefix != s.kafka_topic_prefix:
                entry = _shared_buses[path] = _SharedBus(
                    MemoryBus(s.kafka_topic_prefix, partitions=4, path=path))
            entry.users += 1
            return entry.bus

    def _release_bus(self) -> None:
        bus = self.__dict__.pop("bus")  # a second close() releases nothing
        with _shared_lock:
            for path, entry in list(_shared_buses.items()):
                if entry.bus is bus:
                    entry.users -= 1
                    if entry.users > 0:
                        return
                    del _shared_buses[path]
        bus.close()

    def mailer(self) -> Mailer:
        return mailer_from_settings(self.settings)

    def unsubscriber(self) -> Unsubscriber:
        """Unsubscribe tokens and links, with this deployment's secret."""
        return unsubscriber_from_settings(self.settings)

    def authenticator(self) -> Authenticator:
        """The banner API's bearer-token check, on this container's clock."""
        return authenticator_from_settings(self.settings, self.clock.time)

    # -- for the web layer and the ops endpoints ------------------------------------
    @property
    def version(self) -> str:
        return __version__

    def readiness(self, timeout: float = 2.0) -> tuple[bool, dict[str, str]]:
        """Whether the control DB, every shard and the bus are reachable, per check."""
        return ops.readiness(self, timeout)

    def add_closer(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` at :meth:`close`, before the container's own parts are closed
        (last added, first run): for parts built on top of the container's."""
        self._closers.append(fn)

    # -- workers --------------------------------------------------------------
    def group(self, kind: str) -> str:
        """Consumer group of a worker kind: ``<prefix>-ingest``, ``-evaluate``, ``-deliver``."""
        return f"{self.settings.kafka_topic_prefix}-{kind}"

    def ingest_worker(self, **kw: Any) -> IngestWorker:
        s = self.settings
        consumer = self.bus.consumer(self.group("ingest"), [self.bus.topic("events")])
        return IngestWorker(consumer, self.bus, self.shards, max_bytes=s.profile_max_bytes,
                            batch_max=s.ingest_batch_max, batch_ms=s.ingest_batch_ms,
                            pipeline=s.ingest_pipeline, seen_cap=s.ingest_dedupe_ids,
                            cache_users=s.ingest_cache_users, **kw)

    def evaluator_worker(self, **kw: Any) -> EvaluatorWorker:
        s = self.settings
        consumer = self.bus.consumer(self.group("evaluate"), [self.bus.topic("jobs")])
        return EvaluatorWorker(consumer, self.bus, self.shards, self.rules, self.runs,
                               budget_ms=s.rule_budget_ms,
                               batch_budget_ms=s.rule_batch_budget_ms, timezone=s.timezone,
                               error_rate=s.rule_error_rate_quarantine,
                               error_min_samples=s.rule_error_min_samples,
                               today=kw.pop("today", self.clock.today),
                               sandbox=kw.pop("sandbox", self.sandbox), **kw)

    def delivery_worker(self, **kw: Any) -> DeliveryWorker:
        consumer = self.bus.consumer(self.group("deliver"), [self.bus.topic("results")])
        return DeliveryWorker(  # channel parts: policy, push, unsubscribe links
            consumer, self.bus, self.shards, self.ledger, self.mailer(),
            **(delivery_channel_parts(self.settings) | {"clock": self.clock.now, "arms": self.arms}
               | kw))

    def start_workers(
        self,
        stop: threading.Event,
        kinds: tuple[str, ...] = ("ingest", "evaluate", "deliver"),
    ) -> list[threading.Thread]:
        makers = {"ingest": self.ingest_worker, "evaluate": self.evaluator_worker,
                  "deliver": self.delivery_worker}
        return [makers[k]().start_thread(stop) for k in kinds]

    def close(self) -> None:
        for fn in reversed(self._closers):  # parts built on top of the container's
            fn()
        if "bus" in self.__dict__ and self.bus_override is None:
            self._release_bus()
        if "shards" in self.__dict__:
            self.shards.close()
        if "control" in self.__dict__:
            self.control.dispose()
        if "sandbox" in self.__dict__:
            self.sandbox.close()
