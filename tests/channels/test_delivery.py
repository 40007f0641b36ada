"""The delivery worker on real parts: episodes, once per episode, retries, dead
letters, expiry, the why-data. SQLite and PostgreSQL storage, a real SMTP server."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from shards.schema import episodes, ledger
from tests.channels.deliverykit import (
    Rig,
    backend_settings,
    enter,
    exit_,
    make_rig,
    message_ids,
)
from tests.fixtures.waiting import wait_for


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def rig(request: pytest.FixtureRequest, tmp_path: Any, smtp_server: Any) -> Iterator[Rig]:
    r = make_rig(backend_settings(request, tmp_path, smtp_server.url))
    try:
        yield r
    finally:
        r.close()


# Storage-independent behaviour runs on SQLite only (keeps the suite fast).
SQLITE_ONLY = pytest.mark.parametrize("rig", ["sqlite"], indirect=True)


def _episode(rig: Rig, uid: int, rule: str) -> dict[str, Any]:
    store = rig.container.shards.for_user(uid)
    with store.engine.connect() as conn:
        row = conn.execute(select(episodes).where(
            (episodes.c.user_id == uid) & (episodes.c.rule_key == rule))).first()
    assert row is not None
    return dict(row._mapping)


def test_episodes_banner_lives_for_the_episode_and_mail_goes_once(
    rig: Rig, smtp_server: Any
) -> None:
    uid = 4_200_000_001
    # enter: the banner shows, one e-mail goes out
    rig.publish(enter(uid, "r1", 1))
    rig.drain()
    assert [b["id"] for b in rig.banners(uid)] == ["r1.1"]
    assert message_ids(smtp_server) == [f"<{uid}.r1.1@kvadrupel>"]
    assert _episode(rig, uid, "r1")["status"] == "active"

    # keep matching: the same enter delivered again (re-run, redelivery) changes nothing
    rig.publish(enter(uid, "r1", 1), enter(uid, "r1", 1))
    rig.drain()
    assert len(smtp_server.messages) == 1
    assert [b["id"] for b in rig.banners(uid)] == ["r1.1"]

    # exit: the banner goes; the episode is over
    rig.publish(exit_(uid, "r1", 1))
    rig.drain()
    assert rig.banners(uid) == []
    assert _episode(rig, uid, "r1")["status"] == "ended"

    # re-enter: a new episode, a new banner and exactly one more e-mail
    rig.publish(enter(uid, "r1", 2), enter(uid, "r1", 2))
    rig.drain()
    assert [b["id"] for b in rig.banners(uid)] == ["r1.2"]
    assert sorted(message_ids(smtp_server)) == sorted(
        [f"<{uid}.r1.1@kvadrupel>", f"<{uid}.r1.2@kvadrupel>"])
    ep = _episode(rig, uid, "r1")
    assert (ep["episode"], ep["status"], ep["version"]) == (2, "active", 1)
    assert ep["why"]["fields"] == {"driver_license.expires_on": "2026-12-10"}
    assert ep["why"]["rule"] == "r1" and ep["why"]["as_of"] == "2026-11-24"
    assert rig.statuses(uid) == {(uid, "r1", 1, "email"): "sent", (uid, "r1", 2, "email"): "sent"}

    # a late duplicate of the old episode neither resurrects it nor mails again
    rig.publish(enter(uid, "r1", 1))
    rig.drain()
    assert [b["id"] for b in rig.banners(uid)] == ["r1.2"]
    assert _episode(rig, uid, "r1")["episode"] == 2
    assert len(smtp_server.messages) == 2

    # an episode that starts and ends within one batch leaves no banner and sends nothing
    rig.publish(exit_(uid, "r1", 2), enter(uid, "r1", 3), exit_(uid, "r1", 3))
    rig.drain()
    assert rig.banners(uid) == []
    assert (_episode(rig, uid, "r1")["episode"], _episode(rig, uid, "r1")["status"]) == (3, "ended")
    assert len(smtp_server.messages) == 2


def test_episodes_and_payloads_of_one_batch_keep_their_order_and_nulls(
    rig: Rig, smtp_server: Any
) -> None:
    # Given one batch of enters with and without why-data, each with its own e-mail
    # text (quotes and backslashes included: they travel as JSON)
    uids = [4_200_000_101 + i for i in range(6)]
    results = []
    for i, uid in enumerate(uids):
        r = enter(uid, "r1", 1)
        r["email"]["subject"] = f'"{uid}" \\ {i}'
        if i % 2:
            r["why"] = None
        results.append(r)
    rig.publish(*results)

    # When the worker handles it
    rig.drain()

    # Then every episode has its own why-data (none where the result had none; on
    # PostgreSQL an SQL NULL, as a single insert stores it)...
    for i, uid in enumerate(uids):
        why = _episode(rig, uid, "r1")["why"]
        assert (why is None) if i % 2 else (why["rule"] == "r1")
        engine = rig.container.shards.for_user(uid).engine
        if engine.dialect.name == "postgresql":
            with engine.connect() as conn:
                null = conn.execute(select(episodes.c.why.is_(None)).where(
                    (episodes.c.user_id == uid) & (episodes.c.rule_key == "r1"))).scalar_one()
            assert null is bool(i % 2)
    # ...every ledger row holds its own e-mail (what a retry would send)...
    with rig.container.control.connect() as conn:
        stored = dict(conn.execute(select(ledger.c.user_id, ledger.c.payload).where(
            ledger.c.user_id.in_(uids))).all())
    assert {u: p["subject"] for u, p in stored.items()} == {
        r["user_id"]: r["email"]["subject"] for r in results}
    # ...and every e-mail carries its own user's subject
    got = {m.rcpt_tos[0]: m.message["Subject"] for m in smtp_server.messages}
    assert got == {r["email"]["to"]: r["email"]["subject"] for r in results}
    assert len(set(got.values())) == len(uids)


@SQLITE_ONLY
def test_mail_is_multipart_with_unsubscribe_header_and_link(rig: Rig, smtp_server: Any) -> None:
    uid = 4_200_000_002
    rig.publish(enter(uid, "r1", 1, category="documents"))
    rig.drain()
    (msg,) = [r.message for r in smtp_server.messages]
    assert msg.get_content_type() == "multipart/alternative"
    text = msg.get_body(("plain",)).get_content()
    html = msg.get_body(("html",)).get_content()
    url = str(msg["List-Unsubscribe"]).strip("<>")
    assert url.startswith("http://127.0.0.1:8000/v1/unsubscribe/")
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert url in text and f'href="{url}"' in html and html.index(url) < html.index("</body>")
    assert msg["X-Kvadrupel-Rule"] == "r1/v1"
    scope = rig.worker.unsubscriber.verify(url.rsplit("/", 1)[1])
    assert (scope.user_id, scope.channel, scope.category) == (uid, "email", "documents")


def test_transient_failures_retry_with_backoff_then_send_once(rig: Rig, smtp_server: Any) -> None:
    uid = 4_200_000_003
    smtp_server.refuse(451)
    rig.publish(enter(uid, "r1", 1))
    rig.drain()
    row = rig.ledger.entries(uid)[0]
    assert (row["status"], row["attempts"]) == ("pending", 1)
    assert "451" in row["error"]
    first_retry = row["next_attempt_at"] - rig.clock.now
    assert timedelta(seconds=0.5) <= first_retry <= timedelta(seconds=1)  # base 1 s, jitter

    rig.worker.run_chores()  # not due yet: nothing happens
    assert rig.ledger.entries(uid)[0]["attempts"] == 1
    rig.clock.advance(seconds=1)
    rig.worker.run_chores()  # second attempt, still refused
    row = rig.ledger.entries(uid)[0]
    assert row["attempts"] == 2
    assert timedelta(seconds=1) <= row["next_attempt_at"] - rig.clock.now <= timedelta(seconds=2)

    smtp_server.accept()
    rig.clock.advance(seconds=2)
    rig.worker.run_chores()
    assert rig.statuses(uid) == {(uid, "r1", 1, "email"): "sent"}
    assert message_ids(smtp_server) == [f"<{uid}.r1.1@kvadrupel>"]
    rig.clock.advance(hours=1)
    rig.worker.run_chores()
    assert len(smtp_server.messages) == 1


def test_permanent_failure_and_exhausted_retries_become_dead_letters(
    rig: Rig, smtp_server: Any
) -> None:
    bad, flaky = 4_200_000_004, 4_200_000_005
    smtp_server.refuse(550, addresses={f"user{bad}@example.org"})
    rig.publish(enter(bad, "r1", 1, run_id=7))
    rig.drain()
    (row,) = rig.ledger.entries(bad)
    assert (row["status"], row["attempts"], row["reason"]) == ("failed", 1, "permanent failure")
    assert "550" in row["error"]

    smtp_server.refuse(451)
    rig.publish(enter(flaky, "r1", 1, run_id=7))
    rig.drain()
    for _ in range(5):
        rig.clock.advance(seconds=120)
        rig.worker.run_chores()
    (row,) = rig.ledger.entries(flaky)
    assert (row["status"], row["attempts"]) == ("failed", 4)  # max_attempts of the rig
    assert row["reason"] == "gave up after 4 attempts"

    dead = rig.ledger.dead_letters(run_id=7)
    assert {d["user_id"] for d in dead} == {bad, flaky}
    assert rig.ledger.summary(rule_key="r1")["channels"]["email"]["failed"] == 2
    assert rig.ledger.summary(run_id=8)["channels"] == {}
    assert smtp_server.messages == []


@SQLITE_ONLY
def test_banner_expires_at_and_is_not_brought_back(rig: Rig) -> None:
    uid, gone = 4_200_000_006, 4_200_000_007
    soon = (rig.clock.now + timedelta(hours=2)).isoformat()
    past = (rig.clock.now - timedelta(seconds=1)).isoformat()
    rig.publish(enter(uid, "r1", 1, email=False, expires_at=soon),
                enter(gone, "r1", 1, email=False, expires_at=past))
    rig.drain()
    assert [b["id"] for b in rig.banners(uid)] == ["r1.1"]
    assert rig.banners(gone) == []
    version = rig.container.shards.for_user(uid).banner_version(uid)

    rig.clock.advance(hours=2, seconds=1)
    rig.worker.run_chores()
    assert rig.banners(uid) == []
    assert rig.container.shards.for_user(uid).banner_version(uid) > version  # caches notice
    assert _episode(rig, uid, "r1")["status"] == "expired"

    rig.publish(enter(uid, "r1", 1, email=False, expires_at=soon))  # a redelivered enter
    rig.drain()
    assert rig.banners(uid) == []


@SQLITE_ONLY
def test_exit_cancels_unsent_messages_of_the_episode(rig: Rig, smtp_server: Any) -> None:
    uid = 4_200_000_008
    smtp_server.refuse(451)
    rig.publish(enter(uid, "r1", 1))
    rig.drain()
    rig.publish(exit_(uid, "r1", 1))
    rig.drain()
    (row,) = rig.ledger.entries(uid)
    assert (row["status"], row["reason"]) == ("cancelled", "episode ended before sending")
    smtp_server.accept()
    rig.clock.advance(hours=1)
    rig.worker.run_chores()
    assert smtp_server.messages == []


@SQLITE_ONLY
def test_malformed_results_are_dead_lettered(rig: Rig) -> None:
    rig.publish({"kind": "enter", "user_id": 5})  # no rule, episode...
    rig.drain()
    consumer = rig.bus.consumer("dlq-reader", [rig.bus.topic("results.dlq")])
    got: list = []

    def polled() -> list:
        got.extend(consumer.poll(10, 0.1))
        return got

    try:
        wait_for(polled, "the result on results.dlq", timeout=5, every=0)
    finally:
        consumer.close()
    assert len(got) == 1
