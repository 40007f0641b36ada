"""``POST /v1/events``: 422 with the reason per event and nothing queued; 202 only
once the bus has every event; a client retry applies once."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from base.errors import BusError
from engine.buses.memory import MemoryBus
from kvadrupel.container import Container
from kvadrupel.settings import Settings

TOKEN = "ing-" + "y" * 20


class FailingBus(MemoryBus):
    """The in-process bus, except that flush fails while ``broken`` is set (the
    outcome a Kafka client reports when the brokers do not acknowledge)."""

    broken = False

    def flush(self, timeout: float = 30.0) -> None:
        if self.broken:
            raise BusError("1 message(s) not delivered: broker unreachable")


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[TestClient, Container, FailingBus]]:
    bus = FailingBus(f"t{uuid.uuid4().hex[:8]}")
    bus.ensure_topics(bus.topics.values(), 4)
    settings = Settings(
        data_dir=tmp_path / "data",
        ingest_token=TOKEN,
        admin_token="a" * 24,
        portal_token="p" * 24,
        profile_max_bytes=4096,
    )
    container = Container(settings, bus_override=bus)
    container.migrate()
    client = TestClient(create_app(container))
    yield client, container, bus
    client.close()
    container.close()


def post(client: TestClient, body: object) -> object:
    return client.post(
        "/v1/events",
        content=orjson.dumps(body),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )


def test_one_bad_event_refuses_the_request_with_a_reason_per_event(app) -> None:  # noqa: ANN001
    client, _, bus = app
    # Given a request with good events and bad ones of every kind
    body = [
        {"event_id": "ok", "user_id": 1, "inc": {"n": 1}},
        {"event_id": "op", "user_id": 1, "merge": {"a": 1}},  # unknown operation
        {"event_id": "ty", "user_id": 1, "inc": {"n": "1"}},  # wrong type
        {"event_id": "rg", "user_id": 1, "inc": {"n": 2**63}},  # out of range
        {"event_id": "p1", "user_id": 2, "set": {"a": 1}},
        {"event_id": "p2", "user_id": 2, "inc": {"a.b": 1}},  # path into a non-object
        {"event_id": "sz", "user_id": 3, "set": {"big": "x" * 5000}},  # over the size limit
        "not an object",
    ]
    r = post(client, body)
    # Then 422 names each bad event with its reason...
    assert r.status_code == 422, r.text
    errors = {e["index"]: e["reason"] for e in r.json()["errors"]}
    assert sorted(errors) == [1, 2, 3, 5, 6, 7]
    assert "merge" in errors[1] and "number" in errors[2] and "range" in errors[3]
    assert "not an object" in errors[5] and "limit" in errors[6] and "JSON object" in errors[7]
    # ...and nothing of the request was queued
    assert bus.messages(bus.topic("events")) == []


def test_202_means_queued_and_a_retry_applies_once(app) -> None:  # noqa: ANN001
    client, container, bus = app
    body = {"events": [{"event_id": f"r{i}", "user_id": 7, "inc": {"n": 1}} for i in range(3)]}
    assert post(client, body).status_code == 202
    assert post(client, body).status_code == 202  # the client retries the same request
    assert len(bus.messages(bus.topic("events"))) == 6
    # When the ingest worker applies what was queued
    worker = container.ingest_worker()
    try:
        while worker.handled < 6:
            worker.step()
    finally:
        worker.close()
    # Then each event counted once
    assert container.shards.for_user(7).get_profile(7) == {"n": 3}


def test_no_202_unless_the_bus_has_the_events(app) -> None:  # noqa: ANN001
    client, _, bus = app
    bus.broken = True
    r = post(client, {"event_id": "x", "user_id": 1, "inc": {"n": 1}})
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    bus.broken = False
    assert post(client, {"event_id": "x", "user_id": 1, "inc": {"n": 1}}).status_code == 202


def test_concurrent_requests_each_hear_their_own_outcome(app) -> None:  # noqa: ANN001
    client, _, bus = app
    codes: list[int] = []

    def send(i: int) -> None:
        r = post(
            client,
            [{"event_id": f"c{i}-{k}", "user_id": 100 + i, "inc": {"n": 1}} for k in range(5)],
        )
        codes.append(r.status_code)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [202] * 20
    assert len(bus.messages(bus.topic("events"))) == 100


def test_bodies_over_the_limits_are_refused(app) -> None:  # noqa: ANN001
    client, _, bus = app
    r = post(client, [{"event_id": f"e{i}", "user_id": 1, "inc": {"n": 1}} for i in range(10_001)])
    assert r.status_code == 413
    assert post(client, []).status_code == 422
    assert post(client, {"events": [], "extra": 1}).status_code == 422
    assert bus.messages(bus.topic("events")) == []
