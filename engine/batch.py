"""The loop every pipeline worker shares: poll a batch, process it, commit it.

A batch that fails (a shard down, the broker unreachable) is kept and retried
with backoff (0.1 s doubling to ``max_backoff``), and the consumer is paused
meanwhile: the worker never moves past messages it has not processed, and holds
at most the batch it is retrying (backpressure). While paused it keeps polling
(nothing arrives from paused partitions) so that it stays in its consumer group,
and it drops from the kept batch the partitions the group gave to another member:
their new owner starts from the last committed offset. After the first success
the consumer resumes by itself. Offsets are committed only after the batch's
effects are durable.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod

from engine.bus import Consumer, Message

__all__ = ["BatchWorker"]

log = logging.getLogger("kvadrupel.worker")


class BatchWorker(ABC):
    name = "worker"
    poll_max = 500
    poll_timeout = 0.1
    max_backoff = 5.0

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.handled = 0
        self.failures = 0
        self.paused = False  # backpressure: the consumer is paused while a batch fails
        self._batch: list[Message] | None = None
        self._backoff = 0.1

    @abstractmethod
    def process(self, batch: list[Message]) -> None:
        """Make the batch's effects durable; raise to have it retried."""

    def idle(self) -> None:  # noqa: B027 - optional hook
        """Called when a poll returned nothing (periodic chores)."""

    def step(self) -> int:
        """Handle at most one batch; return how many messages were handled."""
        if self._batch is None:
            batch = self.consumer.poll(self.poll_max, self.poll_timeout)
            if not batch:
                self.idle()
                return 0
            self._batch = batch
        else:
            self._batch = self._held(self._batch) or None
            if self._batch is None:
                return 0
        batch = self._batch
        self.process(batch)
        self.consumer.commit(batch)
        self._batch = None
        self.handled += len(batch)
        return len(batch)

    def _held(self, batch: list[Message]) -> list[Message]:
        """The messages of ``batch`` whose partitions this member still holds."""
        held = set(self.consumer.assignment())
        return [m for m in batch if (m.topic, m.partition) in held]

    def _keep(self, messages: list[Message]) -> None:
        """Messages polled while paused (fetched before the pause took effect):
        they go after the kept ones, so nothing is skipped."""
        self._batch = [*(self._batch or ()), *messages]

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    self.step()
                except Exception as exc:  # noqa: BLE001 - a worker must outlive a bad batch
                    self.failures += 1
                    log.warning("%s: batch of %d failed (%s); retrying in %.1fs", self.name,
                                len(self._batch or ()), exc, self._backoff,
                                exc_info=self.failures <= 3)
                    self._back_off(stop)
                    continue
                if self.paused:
                    self._resume()
            self.drain()
        finally:
            self.close()

    def _back_off(self, stop: threading.Event) -> None:
        if not self.paused:
            try:
                self.consumer.pause()
                self.paused = True
            except Exception:  # noqa: BLE001 - retried at the next failure
                log.warning("%s: cannot pause the consumer", self.name, exc_info=True)
        deadline = time.monotonic() + self._backoff
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                # Keeps the group membership alive (max.poll.interval.ms).
                extra = self.consumer.poll(self.poll_max, min(left, 0.5))
            except Exception:  # noqa: BLE001 - the broker may be down too
                stop.wait(min(left, 0.5))
                continue
            if extra:
                self._keep(extra)
        self._backoff = min(self._backoff * 2, self.max_backoff)

    def _resume(self) -> None:
        try:
            self.consumer.resume()
        except Exception:  # noqa: BLE001 - stays paused; tried again after the next batch
            log.warning("%s: cannot resume the consumer", self.name, exc_info=True)
            return
        self.paused = False
        self._backoff = 0.1
        log.info("%s: resumed", self.name)

    def drain(self) -> None:  # noqa: B027 - optional hook
        """Called once when stopping, before :meth:`close` (finish in-flight work)."""

    def close(self) -> None:
        self.consumer.close()

    def start_thread(self, stop: threading.Event) -> threading.Thread:
        t = threading.Thread(target=self.run, args=(stop,), name=self.name, daemon=True)
        t.start()
        return t
