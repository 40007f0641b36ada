"""Group commit onto the events topic: the REST ingest route's publisher.

Requests hand their events (keyed messages) to one :class:`GroupPublisher`; its
thread publishes and flushes the messages of concurrent requests in groups (one
round of acks per group). A group is acknowledged only after ``flush`` confirmed
every message of it (Kafka: ``acks=all`` on the process's idempotent producer,
whose ``flush`` reports the failures of the calling thread's messages only;
embedded: see :mod:`engine.buses.memory`); if anything in the group failed, every
request of the group hears it (and the API answers 503: retrying is harmless, an
``event_id`` already applied to a profile is skipped).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

from base.errors import BusError
from engine.bus import Bus

__all__ = ["FLUSH_TIMEOUT_S", "GROUP_MAX", "GroupPublisher"]

FLUSH_TIMEOUT_S = 10.0
GROUP_MAX = 20_000  # messages per group commit

# One request's messages ((value, key) pairs) and the future it waits on.
_Submitted = tuple[list[tuple[bytes, bytes]], Future[None]]


class GroupPublisher:
    """Publishes batches of keyed messages; each caller learns whether *its*
    messages are durably on the bus. One thread does every publish and flush:
    one flush (one round of acks) per group of concurrent requests."""

    def __init__(self, bus: Bus, topic: str) -> None:
        self.bus = bus
        self.topic = topic
        self._queue: list[_Submitted] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="rest-publisher", daemon=True)
        self._thread.start()

    def submit(self, messages: list[tuple[bytes, bytes]]) -> Future[None]:
        fut: Future[None] = Future()
        with self._cond:
            if self._closed:
                fut.set_exception(BusError("the API is shutting down"))
                return fut
            self._queue.append((messages, fut))
            self._cond.notify()
        return fut

    def close(self) -> None:
        """Finish what was submitted, stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=FLUSH_TIMEOUT_S + 5)

    def _take(self) -> list[_Submitted]:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            group: list[_Submitted] = []
            size = 0
            while self._queue and (not group or size + len(self._queue[0][0]) <= GROUP_MAX):
                item = self._queue.pop(0)
                group.append(item)
                size += len(item[0])
            return group

    def _run(self) -> None:
        while True:
            group = self._take()
            if not group:  # closed and drained
                return
            try:
                for messages, _ in group:
                    for value, key in messages:
                        self.bus.publish(self.topic, value, key=key)
                self.bus.flush(FLUSH_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - every caller of the group hears it
                for _, fut in group:
                    fut.set_exception(exc)
            else:
                for _, fut in group:
                    fut.set_result(None)
