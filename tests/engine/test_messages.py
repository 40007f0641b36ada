"""The bus messages (engine/messages.py): round trips, versions, what is refused,
and that a worker dead-letters what it cannot read instead of crashing."""

from __future__ import annotations

import threading
from pathlib import Path

import orjson
import pytest

from engine.messages import (
    VERSION,
    Enter,
    Exit,
    MessageError,
    RangeJob,
    UsersJob,
    dead_letter,
    decode_job,
    decode_result,
    encode,
)
from kvadrupel.container import Container
from kvadrupel.settings import Settings
from tests.fixtures.waiting import wait_for

ENTER = Enter(v=VERSION, user_id=1000001, rule="dl-expiring", episode=2, version=3,
              as_of="2026-11-24", priority=110, run_id=7, banner={"title": "t"}, lang="en",
              why={"fields": {"a": 1}})


def test_every_message_round_trips_with_its_version() -> None:
    for msg, decode in ((RangeJob(v=VERSION, run_id=1, range_no=2, shard=0, lo=1, hi=9,
                                  as_of="2026-11-24"), decode_job),
                        (UsersJob(v=VERSION, shard=1, user_ids=[5, 6]), decode_job),
                        (ENTER, decode_result),
                        (Exit(v=VERSION, user_id=5, rule="r", episode=1, version=1,
                              as_of="2026-11-24"), decode_result)):
        data = encode(msg)
        assert orjson.loads(data)["v"] == VERSION
        assert decode(data) == msg


def test_the_previous_version_without_a_version_field_is_read() -> None:
    # A rolling upgrade: an old producer's bytes, exactly as it wrote them
    old_job = orjson.dumps({"type": "range", "run_id": 1, "range_no": 0, "shard": 0, "lo": 1,
                            "hi": 2**63 - 1, "as_of": "2026-11-24", "rules": None})
    job = decode_job(old_job)
    assert isinstance(job, RangeJob) and job.v == 0 and job.hi == 2**63 - 1
    old_result = orjson.dumps({"kind": "exit", "user_id": 5, "rule": "r", "episode": 1,
                               "version": 1, "priority": 0, "as_of": "2026-11-24",
                               "run_id": None})
    assert isinstance(decode_result(old_result), Exit)
    # and an old consumer reads the new bytes: the fields it knows are all there
    new = orjson.loads(encode(ENTER))
    assert {"kind", "user_id", "rule", "episode", "version", "priority", "as_of", "run_id",
            "banner", "email", "lang", "user_lang", "tz", "push", "why"} <= set(new)


@pytest.mark.parametrize("data, cause", [
    (b"not json", "malformed"),
    (b'{"type": "range", "run_id": "x"}', "malformed"),
    (b'{"type": "nightly", "run_id": 1}', "malformed"),
    (b'{"type": "users", "shard": 0, "user_ids": [1], "v": 99}', "unknown message version 99"),
    (b'{"type": "users", "shard": 0}', "user_ids"),
])
def test_bad_jobs_are_refused_with_the_cause(data: bytes, cause: str) -> None:
    with pytest.raises(MessageError, match=cause):
        decode_job(data)


def test_a_dead_letter_keeps_the_cause_the_source_and_the_bytes() -> None:
    letter = orjson.loads(dead_letter("bad", b"\xff\x00", {"topic": "t", "partition": 1,
                                                          "offset": 9}))
    assert letter["cause"] == "bad" and letter["source"]["offset"] == 9
    assert letter["encoding"] == "base64" and letter["original"] == "/wA="


def test_workers_dead_letter_what_they_cannot_read_and_go_on(tmp_path: Path) -> None:
    # Given an evaluator and a delivery worker on the embedded bus
    c = Container(Settings(data_dir=tmp_path / "data", bus_durable=False))
    c.migrate()
    stop = threading.Event()
    threads = [c.evaluator_worker().start_thread(stop), c.delivery_worker().start_thread(stop)]
    bus = c.bus
    try:
        # When malformed and too-new messages arrive on the jobs and results topics
        bus.publish(bus.topic("jobs"), b'{"type": "range", "v": 7}')
        bus.publish(bus.topic("jobs"), b"\xff garbage")
        bus.publish(bus.topic("results"), b'{"kind": "enter", "user_id": "me"}')
        bus.publish(bus.topic("results"), encode(Exit(v=VERSION + 1, user_id=5, rule="r",
                                                      episode=1, version=1,
                                                      as_of="2026-11-24")))
        bus.flush()

        # Then each lands on its dead-letter topic with the cause, and the workers live
        def letters(topic: str) -> list[dict]:
            reader = bus.consumer(f"reader-{topic}", [bus.topic(topic)])
            try:
                return [orjson.loads(m.value) for m in reader.poll(100, 0.2)]
            finally:
                reader.close()

        jobs = wait_for(lambda: letters("jobs.dlq"), "2 dead-lettered jobs",
                        until=lambda v: len(v) == 2)
        results = wait_for(lambda: letters("results.dlq"), "2 dead-lettered results",
                           until=lambda v: len(v) == 2)
        assert "unknown message version 7" in jobs[0]["cause"]
        assert jobs[1]["encoding"] == "base64"
        assert "malformed result" in results[0]["cause"]
        assert "unknown message version" in results[1]["cause"]
        assert all(t.is_alive() for t in threads)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
        c.close()
