"""The bus contract (engine/bus.py), checked on every implementation.

Each test runs twice: on the embedded MemoryBus and on KafkaBus against a real
Kafka-protocol broker (Tansu). Topics have PARTITIONS partitions.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

from base.errors import BusError
from engine.bus import Bus, Message
from tests.bus.helpers import collect, partitions_of, poll_for, settle, values
from tests.fixtures.kafka import PARTITIONS


def publish_all(bus: Bus, topic: str, n: int, keys: int = 8) -> list[bytes]:
    """Publish ``n`` messages spread over ``keys`` keys and flush; their values."""
    sent = [f"m{i}".encode() for i in range(n)]
    for i, value in enumerate(sent):
        bus.publish(topic, value, key=f"user-{i % keys}".encode())
    bus.flush()
    return sent


def test_published_messages_are_consumed_with_key_and_value(bus: Bus, group: str) -> None:
    # Given a topic with a keyed and an unkeyed message published
    topic = bus.topic("events")
    bus.publish(topic, b'{"type":"login"}', key=b"user-1")
    bus.publish(topic, b"", key=None)
    bus.flush()

    # When a consumer joins
    with bus.consumer(group, [topic]) as consumer:
        (got,) = collect([consumer], 2)

    # Then both arrive intact, with their coordinates
    by_value = {m.value: m for m in got}
    assert set(by_value) == {b'{"type":"login"}', b""}
    assert by_value[b'{"type":"login"}'].key == b"user-1"
    assert by_value[b""].key is None
    for m in got:
        assert m.topic == topic
        assert 0 <= m.partition < PARTITIONS
        assert m.offset >= 0


def test_messages_with_one_key_keep_their_order_on_one_partition(bus: Bus, group: str) -> None:
    # Given 16 keys, each with 30 numbered messages, published interleaved
    topic = bus.topic("events")
    keys = [f"user-{k}".encode() for k in range(16)]
    for seq in range(30):
        for key in keys:
            bus.publish(topic, str(seq).encode(), key=key)
    bus.flush()

    # When one consumer reads them all
    with bus.consumer(group, [topic]) as consumer:
        (got,) = collect([consumer], len(keys) * 30)

    # Then every key stayed on one partition, in publishing order,
    # and the keys were spread over more than one partition
    by_key: dict[bytes | None, list[Message]] = defaultdict(list)
    for m in got:
        by_key[m.key].append(m)
    assert set(by_key) == set(keys)
    for key, msgs in by_key.items():
        assert len({m.partition for m in msgs}) == 1, key
        msgs.sort(key=lambda m: m.offset)
        assert [int(m.value) for m in msgs] == list(range(30)), key
    assert len({msgs[0].partition for msgs in by_key.values()}) > 1


def test_two_members_split_partitions_and_see_each_message_once(bus: Bus, group: str) -> None:
    # Given two members of one group, settled on disjoint halves of the partitions
    topic = bus.topic("events")
    with bus.consumer(group, [topic]) as a, bus.consumer(group, [topic]) as b:
        held_a, held_b = settle([a, b], partitions_of(topic, PARTITIONS))

        # When messages are published and both members consume and commit
        sent = publish_all(bus, topic, 200, keys=32)
        got_a, got_b = collect([a, b], len(sent))
        late_a, late_b = poll_for([a, b])

    # Then together they saw every message exactly once,
    # each only from the partitions it holds
    assert late_a == late_b == []
    assert sorted(values(got_a + got_b)) == sorted(sent)
    assert got_a and got_b
    assert {(m.topic, m.partition) for m in got_a} <= held_a
    assert {(m.topic, m.partition) for m in got_b} <= held_b


def test_uncommitted_messages_of_a_closed_member_go_to_the_other(bus: Bus, group: str) -> None:
    # Given two settled members and messages on every partition
    topic = bus.topic("events")
    b = bus.consumer(group, [topic])
    with bus.consumer(group, [topic]) as a:
        settle([a, b], partitions_of(topic, PARTITIONS))
        sent = publish_all(bus, topic, 80, keys=32)

        # When A takes its share without committing, while B commits its own,
        got_a, got_b = collect([a, b], len(sent), commit=False)
        b.commit(got_b)
        assert got_a, "A should hold partitions with messages"
        # and A leaves the group
    try:
        (redelivered,) = collect([b], len(got_a))
        (late,) = poll_for([b])
    finally:
        b.close()

    # Then B receives exactly A's uncommitted messages, and nothing it committed again
    assert late == []
    assert sorted(values(redelivered)) == sorted(values(got_a))


def test_only_uncommitted_messages_are_redelivered_to_the_next_member(bus: Bus, group: str) -> None:
    # Given a member that consumed everything but committed only the first half
    # of each partition (acks are in order)
    topic = bus.topic("events")
    sent = publish_all(bus, topic, 40, keys=16)
    with bus.consumer(group, [topic]) as first:
        (got,) = collect([first], len(sent), commit=False)
        per_partition: dict[int, list[Message]] = defaultdict(list)
        for m in sorted(got, key=lambda m: m.offset):
            per_partition[m.partition].append(m)
        done = [m for msgs in per_partition.values() for m in msgs[: len(msgs) // 2]]
        first.commit(done)
        # When it closes without committing the rest

    # Then the next member of the group gets exactly the rest
    with bus.consumer(group, [topic]) as second:
        (redelivered,) = collect([second], len(sent) - len(done))
        (late,) = poll_for([second])
    assert late == []
    assert sorted(values(redelivered)) == sorted(set(sent) - set(values(done)))


def test_committed_offsets_survive_a_new_consumer(bus: Bus, group: str) -> None:
    # Given a member that consumed and committed ten messages, then left
    topic = bus.topic("jobs")
    old = publish_all(bus, topic, 10)
    with bus.consumer(group, [topic]) as first:
        collect([first], len(old))

    # When more messages arrive and a new member joins the same group
    new = [f"new{i}".encode() for i in range(5)]
    for i, value in enumerate(new):
        bus.publish(topic, value, key=f"user-{i}".encode())
    bus.flush()
    with bus.consumer(group, [topic]) as second:
        (got,) = collect([second], len(new))
        (late,) = poll_for([second])

    # Then it starts after the commits: only the new messages
    assert late == []
    assert sorted(values(got)) == sorted(new)


def test_pause_stops_delivery_and_resume_restarts_it(bus: Bus, group: str) -> None:
    # Given a member that is consuming
    topic = bus.topic("events")
    with bus.consumer(group, [topic]) as consumer:
        settle([consumer], partitions_of(topic, PARTITIONS))
        first = publish_all(bus, topic, 10)
        collect([consumer], len(first))

        # When it pauses and more messages are published
        consumer.pause()
        later = [f"later{i}".encode() for i in range(10)]
        for i, value in enumerate(later):
            bus.publish(topic, value, key=f"user-{i}".encode())
        bus.flush()

        # Then nothing is delivered while paused, and everything after resume
        (while_paused,) = poll_for([consumer])
        assert while_paused == []
        consumer.resume()
        (got,) = collect([consumer], len(later))
    assert sorted(values(got)) == sorted(later)


def test_a_paused_member_stays_paused_after_a_rebalance(bus: Bus, group: str) -> None:
    # Given two members, one of them paused
    topic = bus.topic("events")
    everything = partitions_of(topic, PARTITIONS)
    with bus.consumer(group, [topic]) as paused:
        with bus.consumer(group, [topic]) as active:
            settle([paused, active], everything)
            paused.pause()
            first = publish_all(bus, topic, 60, keys=32)
            while_paused, got_active = poll_for([paused, active])
            assert while_paused == []
            active.commit(got_active)

        # When the other leaves, the paused member takes over every partition,
        # and more messages arrive
        settle([paused], everything)
        second = [f"second{i}".encode() for i in range(20)]
        for i, value in enumerate(second):
            bus.publish(topic, value, key=f"user-{i}".encode())
        bus.flush()

        # Then it still receives nothing, from old or new partitions, until resumed
        (still_paused,) = poll_for([paused])
        assert still_paused == []
        paused.resume()
        (got,) = collect([paused], len(first) + len(second) - len(got_active))

    assert got_active
    assert sorted(values(got + got_active)) == sorted(first + second)


def test_resume_also_applies_to_partitions_received_later(bus: Bus, group: str) -> None:
    # Given a member paused while it held every partition, then resumed
    # after a second member took half of them
    topic = bus.topic("events")
    everything = partitions_of(topic, PARTITIONS)
    with bus.consumer(group, [topic]) as first:
        settle([first], everything)
        first.pause()
        with bus.consumer(group, [topic]) as second:
            settle([first, second], everything)
            first.resume()

        # When the second member leaves and messages arrive on every partition
        settle([first], everything)
        sent = publish_all(bus, topic, 40, keys=32)

        # Then the first member receives them all
        (got,) = collect([first], len(sent))
    assert sorted(values(got)) == sorted(sent)


def test_committing_a_partition_not_held_is_refused(bus: Bus, group: str) -> None:
    # Given a member holding the topic's partitions
    topic = bus.topic("events")
    with bus.consumer(group, [topic]) as consumer:
        settle([consumer], partitions_of(topic, PARTITIONS))

        # When it commits a message of a partition it does not hold
        stranger = Message(topic, PARTITIONS + 5, 0, None, b"x")

        # Then the bus refuses
        with pytest.raises(BusError):
            consumer.commit([stranger])


def test_a_closed_consumer_polls_nothing_and_closes_twice(bus: Bus, group: str) -> None:
    # Given a consumer with a message waiting
    topic = bus.topic("events")
    publish_all(bus, topic, 1)
    consumer = bus.consumer(group, [topic])

    # When it is closed (twice)
    consumer.close()
    consumer.close()

    # Then polling returns nothing
    assert consumer.poll(timeout=0.05) == []


def test_partition_of_tells_where_publish_puts_a_key(bus: Bus, group: str) -> None:
    # Given a topic of PARTITIONS partitions
    topic = bus.topic("jobs")
    assert bus.partition_count(topic) == PARTITIONS
    keys = [f"run-7:{i}".encode() for i in range(40)]

    # When messages with 40 keys are published and read back
    for key in keys:
        bus.publish(topic, key, key=key)
    bus.flush()
    with bus.consumer(group, [topic]) as consumer:
        (got,) = collect([consumer], len(keys))

    # Then each arrived on the partition partition_of named, and more than one was used
    assert {m.key: m.partition for m in got} == {k: bus.partition_of(topic, k) for k in keys}
    assert len({m.partition for m in got}) > 1
