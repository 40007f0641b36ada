"""The Kafka bus: :class:`engine.bus.Bus` over confluent-kafka (librdkafka).

Production runs it against Apache Kafka; the tests run it against the Tansu broker.
Nothing here knows which one it talks to: the defaults below are plain Kafka client
settings that happen to also be what Tansu needs (``group.protocol=classic``,
``auto.offset.reset=earliest``).

* Producer: idempotent (``acks=all``), a few ms of linger, lz4, one per bus, shared
  by every thread. ``publish`` blocks (serving delivery reports) while librdkafka's
  queue is full. :meth:`KafkaBus.flush` is per thread: it waits for the messages the
  calling thread published since its last flush and raises ``BusError`` for their
  failures only (a delivery report is counted against the thread that published the
  message, whichever thread's poll serves it), so threads sharing a bus neither
  take nor hide each other's failures.
* Consumer: manual, synchronous, per-partition commits ("ack" = in-order offset
  commit); nothing is committed or stored automatically. ``pause`` survives
  rebalances. ``on_revoke`` runs before a member loses partitions: the worker may
  still commit what it finished there and must drop the rest, because commits for
  partitions it no longer holds are refused (``BusError``).
* Consumer lag: every ``lag_interval_ms`` (librdkafka's ``statistics.interval.ms``;
  0: off) a consumer sets the ``kvadrupel_consumer_lag`` gauge of each partition
  it holds to the high watermark minus the group's committed offset, from the
  statistics librdkafka gathers anyway (no request to the broker), and drops the
  series of the partitions it loses.
* ``extra`` adds librdkafka settings: a plain key goes to every client (security,
  ``socket.*``), a key prefixed ``producer.``, ``consumer.`` or ``admin.`` only to
  that client (``producer.message.timeout.ms``).

confluent-kafka's exceptions are translated to :class:`~base.errors.BusError`
at this boundary.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import orjson
from confluent_kafka import Consumer as _KConsumer
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka import Message as _KMessage
from confluent_kafka import Producer as _KProducer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic  # where it is defined (admin re-exports it)

from base import metrics
from base.errors import BusError, ConfigError
from engine.bus import Bus, Consumer, Message, RevokeCallback

__all__ = ["KafkaBus", "KafkaConsumer", "RevokeCallback", "murmur2"]

log = logging.getLogger(__name__)

# RevokeCallback (engine.bus) runs inside ``poll``/``close``; on Kafka it is also
# called for partitions already lost (session expired).

_CLIENT_PREFIXES = ("producer.", "consumer.", "admin.")

# Defaults shared by every client; ``extra`` overrides them.
_PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
    # bench/bench_bus.py on Tansu: same produce rate as "none", consume+commit
    # ~1.8x faster (fewer bytes fetched); cheap on CPU, supported by every broker.
    "compression.type": "lz4",
    # The Java client's partitioner: keys land on the same partition whichever
    # client (ours or a JVM producer) wrote them. librdkafka's default is CRC32.
    "partitioner": "murmur2_random",
}
_CONSUMER_DEFAULTS: dict[str, Any] = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    # Also the only value that works on Tansu, whose "latest offset" lookup is wrong.
    "auto.offset.reset": "earliest",
    # Tansu never assigns partitions under the KIP-848 protocol; Kafka supports both.
    "group.protocol": "classic",
    # Bound the prefetch buffer: librdkafka's defaults (100k messages per partition,
    # 64 MiB) let a worker that is behind hold hundreds of MiB of messages it cannot
    # process yet. Workers take at most one batch at a time; this keeps memory flat
    # under overload (the overload drill measures it) at no cost in throughput.
    "queued.min.messages": 20000,
    "queued.max.messages.kbytes": 16384,
}

_PUBLISH_BLOCK_S = 60.0  # longest a publish waits for room in a full producer queue
# A flush serves delivery reports in slices this long and checks its own thread's
# messages between them: while other threads keep publishing the queue never drains,
# so a whole-queue flush would wait on them.
_FLUSH_SLICE_S = 0.01
# How long a topic's partition count is trusted (partition_of): partitions are only
# ever added by an operator, and librdkafka itself refreshes metadata every 5 min.
_PARTITION_COUNT_TTL_S = 30.0

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (the Java client's ``Utils.murmur2``, seed 0x9747b28c), as an
    unsigned 32-bit int. The partition of a key is ``(murmur2(key) & 0x7fffffff) % P``."""
    length = len(data)
    h = (0x9747B28C ^ length) & _MASK
    n4 = length & ~3
    for i in range(0, n4, 4):
        k = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24)
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    rest = length & 3
    if rest == 3:
        h ^= data[n4 + 2] << 16
    if rest >= 2:
        h ^= data[n4 + 1] << 8
    if rest >= 1:
        h ^= data[n4]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


def _murmur2_partition(key: bytes, n: int) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % n


def _crc32_partition(key: bytes, n: int) -> int:
    return zlib.crc32(key) % n


# librdkafka's keyed partitioners, as functions of (key, partition count). The
# "_random" variants differ only for messages without a key.
_PARTITIONERS: dict[str, Callable[[bytes, int], int]] = {
    "murmur2": _murmur2_partition,
    "murmur2_random": _murmur2_partition,
    "consistent": _crc32_partition,
    "consistent_random": _crc32_partition,  # librdkafka's default
}


def _split_extra(extra: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Sort ``extra`` into per-client dicts: {"common", "producer", "consumer", "admin"}."""
    out: dict[str, dict[str, Any]] = {"common": {}, "producer": {}, "consumer": {}, "admin": {}}
    for key, value in (extra or {}).items():
        for prefix in _CLIENT_PREFIXES:
            if key.startswith(prefix):
                out[prefix[:-1]][key[len(prefix) :]] = value
                break
        else:
            out["common"][key] = value
    return out


def _log_client_error(err: KafkaError) -> None:
    # Broker-down and similar errors are transient: librdkafka retries them, message
    # timeouts come back as delivery reports and consumer errors through consume().
    if err.fatal():
        log.error("kafka fatal error: %s", err)
    else:
        log.warning("kafka client error: %s", err)


def _bus_error(what: str, exc: BaseException) -> BusError:
    return BusError(f"{what}: {exc}")


class _Outstanding:
    """One thread's messages published since its last flush.

    Its ``delivered`` is the messages' delivery callback: librdkafka runs it in
    whichever thread serves the report (a poll in ``publish`` or ``flush``), so
    the counts are guarded by ``lock``."""

    __slots__ = ("delivered", "failed", "lock", "pending")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending = 0  # published, no delivery report yet
        self.failed: list[tuple[str, KafkaError]] = []
        self.delivered = self._delivered  # one bound method per thread, not per message

    def _delivered(self, err: KafkaError | None, msg: _KMessage) -> None:
        with self.lock:
            self.pending -= 1
            if err is not None:
                self.failed.append((msg.topic() or "?", err))


class KafkaBus(Bus):
    """A bus on a Kafka cluster. Nothing connects until first used."""

    def __init__(
        self,
        bootstrap: str,
        prefix: str = "kvadrupel",
        *,
        session_timeout_ms: int = 45000,
        heartbeat_interval_ms: int = 3000,
        fetch_wait_max_ms: int = 100,
        extra: Mapping[str, Any] | None = None,
        client_id: str = "kvadrupel",
        lag_interval_ms: int = 15000,
    ) -> None:
        if not bootstrap:
            raise ConfigError("KafkaBus needs bootstrap servers (KVADRUPEL_KAFKA_BOOTSTRAP)")
        super().__init__(prefix)
        self.bootstrap = bootstrap
        self.client_id = client_id
        parts = _split_extra(extra)
        common = {
            "bootstrap.servers": bootstrap,
            "client.id": client_id,
            "logger": log,
            "error_cb": _log_client_error,
        }
        common.update(parts["common"])
        self._producer_conf = {
            **common,
            **_PRODUCER_DEFAULTS,
            "error_cb": self._on_producer_error,
            **parts["producer"],
        }
        self._consumer_conf = {
            **common,
            **_CONSUMER_DEFAULTS,
            "session.timeout.ms": session_timeout_ms,
            "heartbeat.interval.ms": heartbeat_interval_ms,
            "fetch.wait.max.ms": fetch_wait_max_ms,
            "statistics.interval.ms": lag_interval_ms,
            **parts["consumer"],
        }
        self._admin_conf = {**common, **parts["admin"]}

        self._lock = threading.Lock()
        self._producer: _KProducer | None = None
        # Producers replaced after a fatal error while they still held messages:
        # flushes keep serving their delivery reports until they are empty.
        self._retired: list[_KProducer] = []
        self._admin: AdminClient | None = None
        self._local = threading.local()  # .outstanding: the thread's _Outstanding
        self._fatal: KafkaError | None = None
        self._consumers: weakref.WeakSet[KafkaConsumer] = weakref.WeakSet()
        self._closed = False
        self._partition_counts: dict[str, tuple[int, float]] = {}  # topic: (count, read at)

    def __repr__(self) -> str:
        return f"KafkaBus({self.bootstrap!r}, prefix={self.prefix!r})"

    # -- callbacks (librdkafka threads call them from poll/flush/consume) --------
    def _on_producer_error(self, err: KafkaError) -> None:
        # Fatal errors end an idempotent producer (its ordering guarantees can no
        # longer be kept); the rest are transient and retried by librdkafka.
        _log_client_error(err)
        if err.fatal():
            with self._lock:
                self._fatal = err

    def _outstanding(self) -> _Outstanding:
        mine: _Outstanding | None = getattr(self._local, "outstanding", None)
        if mine is None:
            mine = self._local.outstanding = _Outstanding()
        return mine

    # -- admin -------------------------------------------------------------------
    def _admin_client(self) -> AdminClient:
        if self._admin is None:
            self._admin = AdminClient(self._admin_conf)
        return self._admin

    def ensure_topics(self, names: Iterable[str], partitions: int, timeout: float = 30.0) -> None:
        """Create missing topics with ``partitions`` partitions and wait until visible.

        Existing topics are left as they are (partitions are never added: that would
        move keys to other partitions and break their order).
        """
        names = list(dict.fromkeys(names))
        admin = self._admin_client()
        deadline = time.monotonic() + timeout
        try:
            existing = admin.list_topics(timeout=timeout).topics
            missing = [n for n in names if n not in existing]
            if missing:
                # replication_factor=-1: the cluster's default.replication.factor.
                new = [NewTopic(n, num_partitions=partitions, replication_factor=-1)
                       for n in missing]
                futures = admin.create_topics(new, request_timeout=timeout)
                for name, fut in futures.items():
                    try:
                        fut.result(timeout=max(0.1, deadline - time.monotonic()))
                    except KafkaException as exc:
                        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                            raise _bus_error(f"cannot create topic {name}", exc) from exc
            # Creation is asynchronous on a real cluster: wait until the metadata
            # shows every topic with its partitions, so a consumer can subscribe.
            while True:
                md = admin.list_topics(timeout=max(0.1, deadline - time.monotonic())).topics
                absent = [n for n in names if n not in md or md[n].error is not None]
                if not absent:
                    for n in names:
                        if len(md[n].partitions) != partitions:
                            log.warning(
                                "topic %s has %d partitions, not %d",
                                n, len(md[n].partitions), partitions,
                            )
                    return
                if time.monotonic() >= deadline:
                    raise BusError(f"topics not visible after {timeout}s: {absent}")
                time.sleep(0.05)
        except KafkaException as exc:
            raise _bus_error("ensure_topics failed", exc) from exc
        except TimeoutError as exc:  # concurrent.futures.TimeoutError
            raise _bus_error("ensure_topics timed out", exc) from exc

    # -- producer ----------------------------------------------------------------
    def _get_producer(self) -> _KProducer:
        producer = self._producer
        if producer is None:
            with self._lock:
                if self._closed:
                    raise BusError("bus is closed")
                if self._producer is None:
                    try:
                        self._producer = _KProducer(self._producer_conf)
                    except KafkaException as exc:
                        raise _bus_error("cannot create producer", exc) from exc
                producer = self._producer
        return producer

    def publish(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        if self._closed:
            raise BusError("bus is closed")
        if self._fatal is not None:
            raise BusError(f"producer failed fatally: {self._fatal}; flush() to reset")
        producer = self._get_producer()
        mine = self._outstanding()
        with mine.lock:
            mine.pending += 1  # before produce: another thread may serve the report at once
        try:
            self._produce(producer, topic, value, key, mine)
        except BaseException:
            with mine.lock:
                mine.pending -= 1  # not queued: no delivery report will come
            raise
        producer.poll(0)

    @staticmethod
    def _produce(producer: _KProducer, topic: str, value: bytes, key: bytes | None,
                 mine: _Outstanding) -> None:
        deadline = None
        while True:
            try:
                producer.produce(topic, value, key, on_delivery=mine.delivered)
                return
            except BufferError:
                # Queue full: the broker is slower than we are. Serve delivery reports
                # (which frees room) instead of dropping or growing without bound.
                now = time.monotonic()
                if deadline is None:
                    deadline = now + _PUBLISH_BLOCK_S
                elif now >= deadline:
                    raise BusError(
                        f"producer queue full for {_PUBLISH_BLOCK_S}s (is the broker up?)"
                    ) from None
                producer.poll(0.05)
            except KafkaException as exc:
                raise _bus_error(f"cannot publish to {topic}", exc) from exc

    def flush(self, timeout: float = 30.0) -> None:
        """Wait for the messages this thread published since its last flush; raise
        BusError if any of them failed or is still undelivered after ``timeout``."""
        mine = self._outstanding()
        deadline = time.monotonic() + timeout
        try:
            while True:
                with mine.lock:
                    pending = mine.pending
                left = deadline - time.monotonic()
                if pending <= 0 or left <= 0:
                    break
                producers = self._producers()
                if not producers:
                    break  # closed: what is pending is reported as undelivered
                # Serves every thread's delivery reports (and sends at once,
                # linger or not); ours may also be served by another thread.
                for producer in producers:
                    producer.flush(min(left, _FLUSH_SLICE_S))
        except KafkaException as exc:
            raise _bus_error("flush failed", exc) from exc
        self._raise_failures(mine, timeout)

    def _producers(self) -> list[_KProducer]:
        with self._lock:
            self._retired = [p for p in self._retired if len(p) > 0]
            current = [self._producer] if self._producer is not None else []
            return current + self._retired

    def _raise_failures(self, mine: _Outstanding, timeout: float) -> None:
        with mine.lock:
            failed, mine.failed = mine.failed, []
            # Still pending: reported now, and waited for again by the next flush
            # (a failure reported later is this thread's too).
            remaining = mine.pending
        with self._lock:
            fatal, self._fatal = self._fatal, None
            if fatal is not None and self._producer is not None:
                # A fatally failed idempotent producer accepts nothing more: start
                # a fresh one (new producer id) on the next publish; the old one's
                # reports still reach the threads that published there.
                self._retired.append(self._producer)
                self._producer = None
        if fatal is not None:
            raise BusError(f"producer failed fatally: {fatal}")
        if failed:
            topic, err = failed[0]
            raise BusError(f"{len(failed)} message(s) not delivered; first to {topic}: {err}")
        if remaining:
            raise BusError(f"{remaining} message(s) still undelivered after {timeout}s")

    def partition_count(self, topic: str) -> int:
        cached = self._partition_counts.get(topic)
        now = time.monotonic()
        if cached is not None and now - cached[1] < _PARTITION_COUNT_TTL_S:
            return cached[0]
        try:
            # All topics: a request naming the topic may create it (auto-creation).
            md: Any = self._admin_client().list_topics(timeout=10).topics.get(topic)
        except KafkaException as exc:
            raise _bus_error(f"cannot read the partitions of {topic}", exc) from exc
        if md is None or md.error is not None or not md.partitions:
            raise BusError(f"topic {topic} not found: {md.error if md is not None else ''}")
        n = len(md.partitions)
        self._partition_counts[topic] = (n, now)
        return n

    def partition_of(self, topic: str, key: bytes) -> int:
        name = str(self._producer_conf.get("partitioner", "consistent_random"))
        partitioner = _PARTITIONERS.get(name)
        if partitioner is None:
            raise BusError(f"partitioner {name!r}: partition_of is not known for it")
        return partitioner(key, self.partition_count(topic))

    # -- consumer ----------------------------------------------------------------
    def consumer(
        self,
        group: str,
        topics: Sequence[str],
        *,
        on_revoke: RevokeCallback | None = None,
    ) -> KafkaConsumer:
        if self._closed:
            raise BusError("bus is closed")
        member = KafkaConsumer(self._consumer_conf, group, list(topics), on_revoke)
        self._consumers.add(member)
        return member

    def ping(self, timeout: float = 2.0) -> None:
        try:
            self._admin_client().list_topics(timeout=timeout)
        except KafkaException as exc:
            raise _bus_error("broker unreachable", exc) from exc

    def close(self, timeout: float = 30.0) -> None:
        """Close this bus's consumers, flush the producer, drop the connections."""
        if self._closed:
            return
        self._closed = True
        for member in list(self._consumers):
            member.close()
        try:
            # Everyone's messages, not only this thread's; failures of other
            # threads' unflushed messages are theirs to hear, this reports ours.
            for producer in self._producers():
                producer.flush(timeout)
            self._raise_failures(self._outstanding(), timeout)
        except KafkaException as exc:
            raise _bus_error("flush failed", exc) from exc
        finally:
            self._producer = None
            self._retired = []
            self._admin = None


class KafkaConsumer(Consumer):
    """One group member; use it from one thread only."""

    def __init__(
        self,
        conf: Mapping[str, Any],
        group: str,
        topics: list[str],
        on_revoke: RevokeCallback | None = None,
    ) -> None:
        self.group = group
        self.topics = topics
        self._on_revoke_cb = on_revoke
        self._paused = False
        self._closing = False
        self._closed = False
        self._pending_error: BusError | None = None
        strategy = str(conf.get("partition.assignment.strategy", ""))
        self._cooperative = "cooperative" in strategy
        # Where a group without a commit starts: then the lag is the whole log.
        self._from_earliest = str(conf.get("auto.offset.reset")) in ("earliest", "smallest",
                                                                     "beginning")
        self._lag_series: set[tuple[str, int]] = set()  # gauge series this member set
        if int(conf.get("statistics.interval.ms") or 0) > 0:
            conf = {**conf, "stats_cb": self._on_stats}
        try:
            self._c = _KConsumer({**conf, "group.id": group})
            self._c.subscribe(
                topics, on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._lost
            )
        except KafkaException as exc:
            raise _bus_error(f"cannot join group {group}", exc) from exc

    # -- rebalance callbacks (run inside consume()/close()) ----------------------
    def _assigned(self, consumer: _KConsumer, partitions: list[TopicPartition]) -> None:
        # librdkafka remembers an application pause per partition object, across
        # assignments: a partition paused once and revoked before resume() would
        # come back paused for good, while one never held before comes back
        # fetching. Assign here (instead of letting the client do it after we
        # return) and set the member's pause state on every new partition, before
        # its first fetch.
        if not partitions:
            return
        if self._cooperative:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        if self._paused:
            consumer.pause(partitions)
        else:
            consumer.resume(partitions)

    def _revoked(self, consumer: _KConsumer, partitions: list[TopicPartition]) -> None:
        self._notify_revoke(partitions)

    def _lost(self, consumer: _KConsumer, partitions: list[TopicPartition]) -> None:
        log.warning("group %s: partitions lost (session expired?)", self.group)
        self._notify_revoke(partitions)

    def _notify_revoke(self, partitions: list[TopicPartition]) -> None:
        self._drop_lag([(tp.topic, tp.partition) for tp in partitions])
        if self._on_revoke_cb is not None and partitions:
            try:
                self._on_revoke_cb([(tp.topic, tp.partition) for tp in partitions])
            except Exception:
                # An exception must not escape into librdkafka's rebalance handling.
                log.exception("on_revoke callback failed")

    # -- lag (librdkafka's statistics callback, run inside consume()) --------------
    def _on_stats(self, raw: str) -> None:
        if self._closing:
            # librdkafka may emit statistics from inside close(): asking the consumer
            # for its assignment there blocks close() for ever (seen in CI).
            return
        try:
            held = {(tp.topic, tp.partition) for tp in self._c.assignment()}
            for topic, t in orjson.loads(raw).get("topics", {}).items():
                for p, d in t.get("partitions", {}).items():
                    if (topic, int(p)) not in held:  # also skips librdkafka's partition -1
                        continue
                    lag = int(d.get("consumer_lag", -1))
                    if lag < 0 and d.get("committed_offset", -1) < 0 and self._from_earliest:
                        hi, lo = int(d.get("hi_offset", -1)), int(d.get("lo_offset", -1))
                        lag = hi - lo if hi >= 0 and lo >= 0 else -1  # nothing committed yet
                    if lag >= 0:
                        metrics.CONSUMER_LAG.labels(self.group, topic, p).set(lag)
                        self._lag_series.add((topic, int(p)))
        except Exception:  # noqa: BLE001 - a metric must never break consuming
            log.debug("cannot read consumer statistics", exc_info=True)

    def _drop_lag(self, pairs: Iterable[tuple[str, int]]) -> None:
        """Remove the gauge series of partitions this member no longer holds (the
        new owner reports them)."""
        for topic, p in pairs:
            if (topic, p) in self._lag_series:
                self._lag_series.discard((topic, p))
                try:
                    metrics.CONSUMER_LAG.remove(self.group, topic, str(p))
                except KeyError:
                    pass

    # -- Consumer API -------------------------------------------------------------
    def poll(self, max_messages: int = 500, timeout: float = 0.1) -> list[Message]:
        if self._closing:
            return []
        if self._pending_error is not None:
            pending, self._pending_error = self._pending_error, None
            raise pending
        try:
            raw = self._c.consume(num_messages=max_messages, timeout=timeout)
        except KafkaException as exc:
            raise _bus_error(f"group {self.group}: consume failed", exc) from exc
        out: list[Message] = []
        for m in raw:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    log.debug("reached end of %s[%s]", m.topic(), m.partition())
                    continue
                error = BusError(f"group {self.group}: {err}")
                if out:
                    # Hand out what was fetched before the error; report it next time.
                    self._pending_error = error
                    break
                raise error
            value = m.value()
            if value is None:  # a tombstone; ours are never published
                value = b""
            # Optional only for error events: a message without error() has all three
            out.append(Message(m.topic(), m.partition(), m.offset(), m.key(), value))  # type: ignore[arg-type]
        return out

    def commit(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        if self._closed:
            raise BusError("consumer is closed")
        top: dict[tuple[str, int], int] = {}
        for m in messages:
            k = (m.topic, m.partition)
            if m.offset > top.get(k, -1):
                top[k] = m.offset
        try:
            held = {(tp.topic, tp.partition) for tp in self._c.assignment()}
            foreign = sorted(set(top) - held)
            if foreign:
                # After a rebalance the partition belongs to someone else, who
                # restarted from the last commit: committing now could skip work.
                raise BusError(f"partitions {foreign} are not assigned to this consumer")
            offsets = [TopicPartition(t, p, off + 1) for (t, p), off in top.items()]
            result = self._c.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            raise _bus_error(f"group {self.group}: commit failed", exc) from exc
        bad = [tp for tp in result or () if tp.error is not None]
        if bad:
            tp = bad[0]
            raise BusError(
                f"group {self.group}: commit of {tp.topic}[{tp.partition}] failed: {tp.error}"
            )

    def pause(self) -> None:
        self._paused = True
        self._set_paused(True)

    def resume(self) -> None:
        self._paused = False
        self._set_paused(False)

    def _set_paused(self, paused: bool) -> None:
        if self._closed:
            return
        try:
            partitions = self._c.assignment()
            if partitions:
                (self._c.pause if paused else self._c.resume)(partitions)
        except KafkaException as exc:
            raise _bus_error(f"group {self.group}: pause/resume failed", exc) from exc

    def assignment(self) -> list[tuple[str, int]]:
        if self._closed:
            return []
        try:
            return sorted((tp.topic, tp.partition) for tp in self._c.assignment())
        except KafkaException as exc:
            raise _bus_error(f"group {self.group}: assignment failed", exc) from exc

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        try:
            # Leaves the group. on_revoke runs first, and may still commit.
            self._c.close()
        except KafkaException as exc:
            raise _bus_error(f"group {self.group}: close failed", exc) from exc
        finally:
            self._closed = True
            self._drop_lag(list(self._lag_series))
