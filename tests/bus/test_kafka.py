"""What only the Kafka bus has: delivery failures, backpressure, rebalance hooks, settings."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from base.errors import BusError, ConfigError
from engine.bus import Message
from engine.buses.kafka import KafkaBus, _split_extra
from kvadrupel.factories import kafka_bus_from_settings
from kvadrupel.settings import Settings
from tests.bus.helpers import collect, partitions_of, poll_for, settle, values
from tests.fixtures.kafka import PARTITIONS, KafkaBusFactory


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.mark.kafka
def test_flush_raises_bus_error_when_the_broker_is_unreachable() -> None:
    # Given a bus pointed at a port nobody listens on, giving up on messages after 1 s
    bus = KafkaBus(
        f"127.0.0.1:{closed_port()}",
        "unreachable",
        extra={"producer.message.timeout.ms": "500"},
    )
    try:
        # When a message is published and flushed
        bus.publish(bus.topic("events"), b"lost", key=b"k")
        started = time.monotonic()
        with pytest.raises(BusError, match="not delivered"):
            bus.flush(timeout=10)

        # Then the failure is reported promptly, once
        assert time.monotonic() - started < 5
        bus.flush(timeout=1)
    finally:
        bus.close(timeout=1)


@pytest.mark.kafka
def test_publish_waits_for_room_when_the_producer_queue_is_full(
    kafka_bus_factory: KafkaBusFactory,
) -> None:
    # Given a bus whose producer queue holds only 10 messages
    bus = kafka_bus_factory(extra={"producer.queue.buffering.max.messages": "10"})
    topic = bus.topic("events")
    bus.ensure_topics([topic], PARTITIONS)

    # When far more are published at once
    sent = [f"m{i}".encode() for i in range(500)]
    for i, value in enumerate(sent):
        bus.publish(topic, value, key=str(i % 7).encode())
    bus.flush()

    # Then none was refused or lost
    with bus.consumer(f"{bus.prefix}-g", [topic]) as consumer:
        (got,) = collect([consumer], len(sent))
    assert sorted(values(got)) == sorted(sent)


# The broker refuses these names: a prompt delivery failure. (librdkafka then knows
# the name and refuses it in publish itself: each failure needs a new name.)
INVALID_TOPIC = "not a valid topic!"


@pytest.mark.kafka
def test_flush_reports_the_failures_of_the_calling_threads_messages(kafka_bus: KafkaBus) -> None:
    # Given a thread that published a message the broker will refuse, not flushed yet
    topic = kafka_bus.topic("events")
    worker = ThreadPoolExecutor(1)  # one thread, kept for the later flush
    try:
        worker.submit(kafka_bus.publish, INVALID_TOPIC, b"refused", b"k").result(timeout=10)

        # When another thread publishes good messages and flushes
        for i in range(20):
            kafka_bus.publish(topic, f"ok{i}".encode(), key=str(i).encode())
        kafka_bus.flush(timeout=20)  # Then it succeeds: the refusal is not its own

        # And the publishing thread's flush reports the refusal, once
        with pytest.raises(BusError, match="1 message"):
            worker.submit(kafka_bus.flush, 20).result(timeout=30)
        worker.submit(kafka_bus.flush, 5).result(timeout=10)
    finally:
        worker.shutdown()
    with kafka_bus.consumer(f"{kafka_bus.prefix}-g", [topic]) as consumer:
        (got,) = collect([consumer], 20)
    assert sorted(values(got)) == sorted(f"ok{i}".encode() for i in range(20))


@pytest.mark.kafka
def test_concurrent_publishers_each_hear_exactly_their_own_failures(kafka_bus: KafkaBus) -> None:
    # Given 8 threads publishing and flushing in lock step, 12 rounds each, some
    # rounds of some threads including a message the broker refuses
    topic = kafka_bus.topic("events")
    threads, rounds = 8, 12
    barrier = threading.Barrier(threads)

    def bad(t: int, r: int) -> bool:
        return (t + r) % 3 == 0

    def run(t: int) -> tuple[list[bool], list[bool]]:
        queued, raised = [], []
        for r in range(rounds):
            barrier.wait(timeout=30)
            refused_queued = False
            for i in range(30):
                kafka_bus.publish(topic, f"{t}.{r}.{i}".encode(), key=f"{t}.{i}".encode())
                if i == 15 and bad(t, r):
                    try:
                        kafka_bus.publish(f"{INVALID_TOPIC} {t}.{r}", b"refused", key=b"k")
                    except BusError:
                        pass  # librdkafka already knew the name was refused: not queued
                    else:
                        refused_queued = True
            queued.append(refused_queued)
            try:
                kafka_bus.flush(timeout=20)
            except BusError as exc:
                assert f"1 message(s) not delivered; first to {INVALID_TOPIC} {t}.{r}:" in str(exc)
                raised.append(True)
            else:
                raised.append(False)
        return queued, raised

    # When they run at once
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(run, range(threads), timeout=120))

    # Then a flush raised exactly in the rounds where its thread queued a refused message
    assert [raised for _, raised in results] == [queued for queued, _ in results]
    assert sum(map(sum, (queued for queued, _ in results))) >= threads  # not vacuous


@pytest.mark.kafka
def test_partition_of_follows_the_configured_partitioner(
    kafka_bus_factory: KafkaBusFactory,
) -> None:
    # Given a bus whose producer uses librdkafka's own default (CRC32), not murmur2
    bus = kafka_bus_factory(extra={"producer.partitioner": "consistent_random"})
    topic = bus.topic("jobs")
    bus.ensure_topics([topic], 6)
    keys = [f"k{i}".encode() for i in range(60)]
    # When keyed messages are published
    for key in keys:
        bus.publish(topic, b"x", key=key)
    bus.flush()
    # Then partition_of agrees with where the broker got them
    with bus.consumer(f"{bus.prefix}-g", [topic]) as consumer:
        (got,) = collect([consumer], len(keys))
    assert bus.partition_count(topic) == 6
    assert {m.key: m.partition for m in got} == {k: bus.partition_of(topic, k) for k in keys}
    # And a partitioner it cannot reproduce, or an unknown topic, is a BusError
    other = kafka_bus_factory(extra={"producer.partitioner": "fnv1a"})
    with pytest.raises(BusError, match="fnv1a"):
        other.partition_of(topic, b"k")
    with pytest.raises(BusError):
        bus.partition_count(f"{bus.prefix}.no-such-topic")


@pytest.mark.kafka
def test_another_bus_instance_resumes_from_committed_offsets(
    kafka_bus: KafkaBus, kafka_bus_factory: KafkaBusFactory
) -> None:
    # Given a group that committed part of a topic through one bus (one process)
    topic = kafka_bus.topic("results")
    group = f"{kafka_bus.prefix}-g"
    for i in range(6):
        kafka_bus.publish(topic, f"r{i}".encode(), key=b"same-key")
    kafka_bus.flush()
    with kafka_bus.consumer(group, [topic]) as first:
        (got,) = collect([first], 6, commit=False)
        first.commit(sorted(got, key=lambda m: m.offset)[:4])

    # When another bus instance (another process) joins the group
    other = kafka_bus_factory()
    with other.consumer(group, [topic]) as second:
        (rest,) = collect([second], 2)
        (late,) = poll_for([second])

    # Then it continues after the last commit, in order
    assert late == []
    assert values(rest) == [b"r4", b"r5"]


@pytest.mark.kafka
def test_on_revoke_is_told_what_a_member_loses_and_may_commit_there(kafka_bus: KafkaBus) -> None:
    # Given a member holding every partition, with work it has finished but not
    # committed, and an on_revoke hook that commits finished work
    topic = kafka_bus.topic("jobs")
    group = f"{kafka_bus.prefix}-g"
    revoked: list[list[tuple[str, int]]] = []
    finished: list[Message] = []

    def on_revoke(partitions: list[tuple[str, int]]) -> None:
        revoked.append(partitions)
        first.commit(finished)
        finished.clear()

    first = kafka_bus.consumer(group, [topic], on_revoke=on_revoke)
    try:
        settle([first], partitions_of(topic, PARTITIONS))
        for i in range(20):
            kafka_bus.publish(topic, f"j{i}".encode(), key=f"user-{i}".encode())
        kafka_bus.flush()
        (done,) = collect([first], 20, commit=False)
        finished.extend(done)
        assert revoked == []

        # When a second member joins
        with kafka_bus.consumer(group, [topic]) as second:
            settle([first, second], partitions_of(topic, PARTITIONS))
            late_first, late_second = poll_for([first, second])

            # Then the hook was told about every partition the first held, and
            # what it committed there is not delivered again
            assert sorted(revoked[0]) == sorted(partitions_of(topic, PARTITIONS))
            assert late_first == late_second == []
            kept = first.assignment()
    finally:
        # And it is told again when the member leaves
        first.close()
    assert sorted(revoked[-1]) == kept


def test_extra_settings_go_to_every_client_or_only_to_the_named_one() -> None:
    parts = _split_extra(
        {
            "security.protocol": "SASL_SSL",
            "producer.message.timeout.ms": "1000",
            "consumer.max.poll.interval.ms": "600000",
            "admin.request.timeout.ms": "5000",
        }
    )
    assert parts == {
        "common": {"security.protocol": "SASL_SSL"},
        "producer": {"message.timeout.ms": "1000"},
        "consumer": {"max.poll.interval.ms": "600000"},
        "admin": {"request.timeout.ms": "5000"},
    }


def test_from_settings_uses_the_kafka_settings() -> None:
    settings = Settings(
        kafka_bootstrap="kafka-1:9092,kafka-2:9092",
        kafka_topic_prefix="prod",
        kafka_session_timeout_ms=30000,
    )
    bus = kafka_bus_from_settings(settings)  # connects to nothing until used
    assert bus.bootstrap == "kafka-1:9092,kafka-2:9092"
    assert bus.topic("events") == "prod.events"
    assert bus._consumer_conf["session.timeout.ms"] == 30000
    assert bus._consumer_conf["heartbeat.interval.ms"] == settings.kafka_heartbeat_interval_ms
    with pytest.raises(ConfigError):
        kafka_bus_from_settings(Settings(kafka_bootstrap=""))
