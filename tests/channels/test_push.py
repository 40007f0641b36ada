"""The push channel against a real HTTP server on loopback that checks the requests
the way FCM HTTP v1 (with its OAuth2 token exchange) and a signed webhook document
them; and push through the delivery worker: once per episode, retries, and
unregistered tokens removed from the profile by an ingest event."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from channels.push import Push
from channels.pushers.fcm import FcmPusher
from channels.pushers.webhook import WebhookPusher
from tests.channels.deliverykit import Rig, embedded_settings, enter, make_rig
from tests.channels.push_receiver import PushReceiver


@pytest.fixture
def receiver() -> Iterator[PushReceiver]:
    r = PushReceiver()
    yield r
    r.stop()


def _pushes(n: int, prefix: str = "tok") -> list[Push]:
    return [Push(token=f"{prefix}-{i}", title=f"Title {i}", body="Body", link="https://x.test/a",
                 data={"rule": "r1", "n": str(i)}, message_id=f"{i}.r1.1") for i in range(n)]


def _send(pusher: Any, pushes: list[Push]) -> list[Any]:
    async def go() -> list[Any]:
        return await pusher.send_many(pushes)
    return asyncio.run(go())


def test_fcm_token_exchange_batching_and_error_classes(receiver: PushReceiver) -> None:
    receiver.unregistered = {"tok-3", "tok-7"}
    receiver.fail_next = 1

    async def go() -> tuple[list[Any], list[Any], list[Any]]:
        pusher = FcmPusher(receiver.account, endpoint=receiver.url, concurrency=4)
        try:
            first = await pusher.send_many(_pushes(10))
            second = await pusher.send_many(_pushes(5, "again"))
            receiver.revoke_next = 1  # the access token stops working: renewed once
            third = await pusher.send_many(_pushes(3, "late"))
        finally:
            await pusher.aclose()
        return first, second, third

    first, second, third = asyncio.run(go())
    assert receiver.violations == []
    assert [r.unregistered for r in first].count(True) == 2
    assert {r.push.token for r in first if r.unregistered} == {"tok-3", "tok-7"}
    transient = [r for r in first if not r.ok and not r.permanent]
    assert len(transient) == 1 and "UNAVAILABLE" in transient[0].error
    assert sum(r.ok for r in first) == 7
    assert all(r.ok for r in second) and all(r.ok for r in third)
    assert receiver.token_requests == 2  # one exchange for two batches, one renewal after the 401
    ok = next(r.push for r in first if r.ok)
    n = ok.data["n"]
    (m,) = [m for m in receiver.delivered if m["token"] == ok.token]
    assert m["notification"] == {"title": f"Title {n}", "body": "Body"}
    assert m["data"] == {"rule": "r1", "n": n, "link": "https://x.test/a"}
    assert m["android"] == {"collapse_key": f"{n}.r1.1"}
    assert m["apns"] == {"headers": {"apns-collapse-id": f"{n}.r1.1"}}


def test_fcm_unreachable_is_transient(receiver: PushReceiver) -> None:
    account = dict(receiver.account)
    receiver.stop()
    results = _send(FcmPusher(account, endpoint=receiver.url, timeout=2), _pushes(2))
    assert [(r.ok, r.permanent) for r in results] == [(False, False), (False, False)]


def test_webhook_is_signed_and_classified(receiver: PushReceiver) -> None:
    receiver.unregistered = {"tok-1"}
    receiver.fail_next = 1
    pusher = WebhookPusher(f"{receiver.url}/hook", receiver.webhook_secret.decode(), concurrency=1)
    results = _send(pusher, _pushes(4))
    assert receiver.violations == []
    assert [(r.ok, r.permanent, r.unregistered) for r in results] == [
        (False, False, False), (False, True, True), (True, False, False), (True, False, False)]
    assert receiver.delivered[0] == {"id": "2.r1.1", "token": "tok-2", "title": "Title 2",
                                     "body": "Body", "link": "https://x.test/a",
                                     "data": {"rule": "r1", "n": "2"}}
    forged = WebhookPusher(f"{receiver.url}/hook", "another-secret-0123456789")
    (bad,) = _send(forged, _pushes(1))
    assert (bad.ok, bad.permanent) == (False, True)
    assert receiver.violations == ["hook: bad signature"]


# -- through the delivery worker -------------------------------------------------------------

UID = 4_400_000_001


@pytest.fixture
def rig(tmp_path: Any, smtp_server: Any, receiver: PushReceiver) -> Iterator[Rig]:
    r = make_rig(embedded_settings(tmp_path, smtp_url=smtp_server.url),
                 pusher=FcmPusher(receiver.account, endpoint=receiver.url, concurrency=4))
    yield r
    r.close()


def test_push_once_per_episode_and_dead_tokens_leave_the_profile(rig: Rig,
                                                                 receiver: PushReceiver) -> None:
    store = rig.container.shards.for_user(UID)
    devices = {"phone": {"push_token": "tok-phone", "platform": "android"},
               "tablet": {"push_token": "tok-tablet", "platform": "ios"}}
    store.put_profiles([(UID, {"name": "Anna", "devices": devices})])
    receiver.unregistered = {"tok-tablet"}
    tokens = {d: v["push_token"] for d, v in devices.items()}
    rig.publish(enter(UID, "r1", 1, email=False, push={"tokens": tokens}))
    rig.drain()
    assert receiver.tokens_delivered() == ["tok-phone"]
    assert rig.statuses(UID) == {(UID, "r1", 1, "push"): "sent"}

    # the same episode again: no second push
    rig.publish(enter(UID, "r1", 1, email=False, push={"tokens": tokens}))
    rig.drain()
    assert receiver.tokens_delivered() == ["tok-phone"]

    # the dead token goes through ingest like any profile change
    ingest = rig.container.ingest_worker()
    try:
        while ingest.step():
            pass
    finally:
        ingest.close()
    profile = store.get_profile(UID)
    assert profile["devices"] == {"phone": {"push_token": "tok-phone", "platform": "android"},
                                  "tablet": {"platform": "ios"}}
    assert rig.worker.outcomes[("push", "unregistered")] == 1
    assert receiver.violations == []


def test_push_retries_only_what_failed(rig: Rig, receiver: PushReceiver) -> None:
    receiver.fail_next = 1
    rig.publish(enter(UID, "r1", 1, email=False, push={"tokens": {"phone": "tok-phone"}}),
                enter(UID, "r2", 1, email=False, push={"tokens": {"phone": "tok-phone"}},
                      category="news"))
    rig.drain()
    st = rig.statuses(UID)
    assert sorted(st.values()) == ["pending", "sent"]
    rig.clock.advance(seconds=2)
    rig.worker.run_chores()
    assert set(rig.statuses(UID).values()) == {"sent"}
    assert len(receiver.delivered) == 2
    assert {m["android"]["collapse_key"] for m in receiver.delivered} == {
        f"{UID}.r1.1", f"{UID}.r2.1"}


def test_all_tokens_dead_is_a_permanent_failure(rig: Rig, receiver: PushReceiver) -> None:
    receiver.unregistered = {"tok-a"}
    rig.publish(enter(UID, "r1", 1, email=False, push={"tokens": {"a": "tok-a"}}))
    rig.drain()
    (row,) = rig.ledger.entries(UID)
    assert (row["status"], row["reason"]) == ("failed", "permanent failure")
    assert "UNREGISTERED" in row["error"]
