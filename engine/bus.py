"""The message bus interface.

Two implementations live in :mod:`engine.buses`: ``memory`` (the embedded,
in-process default) and ``kafka`` (confluent-kafka; Apache Kafka in production).

Semantics every implementation keeps (and ``tests/bus`` checks on both):

* Topics have partitions; messages with the same key go to the same partition and
  keep their order there.
* Consumers in one *group* split a topic's partitions between them.
* ``commit(messages)`` is the "ack": it stores, per partition, the offset after the
  highest message given. A consumer that dies before committing has its messages
  redelivered to whoever takes the partition over. Commit only what is done, in
  order.
* The partition of a keyed message is a function of the key and the topic's
  partition count, and :meth:`Bus.partition_of` tells it.
* ``publish`` may buffer; ``flush`` returns once everything the calling thread
  published so far is durably accepted by the bus, or raises
  :class:`~base.errors.BusError` for a failure of one of those messages:
  threads sharing a bus neither take nor hide each other's failures.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Bus", "Consumer", "Message", "RevokeCallback", "TOPICS", "topic_names"]

# Called with the (topic, partition) pairs a member is about to lose (rebalance,
# close): the last moment to commit finished work or drop in-flight state.
RevokeCallback = Callable[[list[tuple[str, int]]], None]


# Logical topic names. The full name is ``<prefix>.<logical>``; the prefix defaults
# to "kvadrupel", which gives the names in the public contract
# (kvadrupel.events, kvadrupel.events.dlq, kvadrupel.jobs, kvadrupel.jobs.dlq,
# kvadrupel.results, kvadrupel.results.dlq).
TOPICS = ("events", "events.dlq", "jobs", "jobs.dlq", "results", "results.dlq")


def topic_names(prefix: str) -> dict[str, str]:
    return {logical: f"{prefix}.{logical}" for logical in TOPICS}


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes


class Consumer(ABC):
    """One member of a consumer group."""

    @abstractmethod
    def poll(self, max_messages: int = 500, timeout: float = 0.1) -> list[Message]:
        """Return up to ``max_messages`` messages, waiting at most ``timeout`` seconds."""

    @abstractmethod
    def commit(self, messages: Sequence[Message]) -> None:
        """Synchronously commit, per partition, past the highest message given."""

    @abstractmethod
    def pause(self) -> None:
        """Stop fetching from every assigned partition (backpressure)."""

    @abstractmethod
    def resume(self) -> None:
        """Fetch again after :meth:`pause`."""

    @abstractmethod
    def assignment(self) -> list[tuple[str, int]]:
        """The (topic, partition) pairs this member holds now."""

    @abstractmethod
    def close(self) -> None:
        """Leave the group; uncommitted messages go to the next owner."""

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Bus(ABC):
    """Factory of producers and consumers for one bus."""

    def __init__(self, prefix: str = "kvadrupel") -> None:
        self.prefix = prefix
        self.topics = topic_names(prefix)

    def topic(self, logical: str) -> str:
        """Full topic name for a logical name from :data:`TOPICS`."""
        return self.topics[logical]

    @abstractmethod
    def ensure_topics(self, names: Iterable[str], partitions: int) -> None:
        """Create the topics that do not exist yet (idempotent)."""

    @abstractmethod
    def publish(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        """Queue a message; see :meth:`flush`."""

    @abstractmethod
    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every message this thread queued is accepted; raise BusError
        otherwise (see the module docstring)."""

    @abstractmethod
    def partition_count(self, topic: str) -> int:
        """How many partitions ``topic`` has (BusError when that cannot be known)."""

    @abstractmethod
    def partition_of(self, topic: str, key: bytes) -> int:
        """The partition :meth:`publish` puts a message with ``key`` on, in
        ``range(partition_count(topic))`` (BusError when the bus cannot tell). Job
        placement uses it to spread keys evenly over the partitions."""

    @abstractmethod
    def consumer(self, group: str, topics: Sequence[str], *,
                 on_revoke: RevokeCallback | None = None) -> Consumer:
        """Join ``group`` as a new member consuming ``topics``."""

    def ping(self, timeout: float = 2.0) -> None:
        """Raise BusError when the bus cannot be reached (readiness checks)."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Flush and release connections."""
