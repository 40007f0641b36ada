"""The loop every pipeline worker shares: poll a batch, process it, commit it.

A batch that fails (a shard down, the broker unreachable) is kept and retried
with backoff, and the consumer is paused meanwhile: the worker never moves past
messages it has not processed, and never buffers more than one batch
(backpressure). Offsets are committed only after the batch's effects are durable.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod

from engine.bus import Consumer, Message

__all__ = ["BatchWorker"]

log = logging.getLogger("kvadrupel.worker")


class BatchWorker(ABC):
    name = "worker"
    poll_max = 500
    poll_timeout = 0.1

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.handled = 0
        self.failures = 0
        self._batch: list[Message] | None = None
        self._backoff = 0.1

    @abstractmethod
    def process(self, batch: list[Message]) -> None:
        """Make the batch's effects durable; raise to have it retried."""

    def idle(self) -> None:
        """Called when a poll returned nothing (periodic chores)."""

    def step(self) -> int:
        """Handle at most one batch; return how many messages were handled."""
        if self._batch is None:
            batch = self.consumer.poll(self.poll_max, self.poll_timeout)
            if not batch:
                self.idle()
                return 0
            self._batch = batch
        batch = self._batch
        self.process(batch)
        self.consumer.commit(batch)
        self._batch = None
        self.handled += len(batch)
        return len(batch)

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    self.step()
                    if self._backoff > 0.1:
                        self.consumer.resume()
                        self._backoff = 0.1
                except Exception as exc:  # noqa: BLE001 - a worker must outlive a bad batch
                    self.failures += 1
                    log.warning("%s: batch of %d failed (%s); retrying in %.1fs", self.name,
                                len(self._batch or ()), exc, self._backoff,
                                exc_info=self.failures <= 3)
                    self.consumer.pause()
                    stop.wait(self._backoff)
                    self._backoff = min(self._backoff * 2, 5.0)
        finally:
            self.close()

    def close(self) -> None:
        self.consumer.close()

    def start_thread(self, stop: threading.Event) -> threading.Thread:
        t = threading.Thread(target=self.run, args=(stop,), name=self.name, daemon=True)
        t.start()
        return t
