"""Holdouts and the global control group: the assignment, its settings, and the delivery
worker's suppression — ghost episodes, no banner, no ledger claim, no retry."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select

from base.buckets import CONTROL_SALT, bucket, in_share
from channels.holdouts import (
    Arms,
    arm_of,
    check_control,
    check_holdout,
    get_control_share,
    set_control_share,
)
from channels.pushers.fcm import FcmPusher
from shards.schema import episodes, rule_versions, rules
from tests.channels.deliverykit import (
    Rig,
    backend_settings,
    embedded_settings,
    enter,
    exit_,
    make_rig,
    message_ids,
)
from tests.channels.push_receiver import PushReceiver
from tests.channels.test_push import receiver as receiver  # noqa: F401 - the fixture

T0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
BASE = 4_300_000_000


# -- the assignment -----------------------------------------------------------------------
def test_arm_of_shares_precedence_and_salts() -> None:
    users = range(BASE, BASE + 20_000)
    arms = [arm_of(u, "r1", 20.0, 5.0) for u in users]
    share = {a: arms.count(a) / len(arms) for a in ("treatment", "holdout", "control")}
    assert abs(share["control"] - 0.05) < 0.01
    # the holdout is 20 % of those outside the global control group
    assert abs(share["holdout"] - 0.95 * 0.20) < 0.015
    # the global group comes first, whatever the rule
    for u, a in zip(users, arms, strict=True):
        in_control = in_share(bucket(CONTROL_SALT, u), 5.0)
        assert (a == "control") == in_control
        if not in_control:
            assert (a == "holdout") == in_share(bucket("r1", u), 20.0)
    # stable, and independent of the other rule's salt
    assert arms == [arm_of(u, "r1", 20.0, 5.0) for u in users]
    other = [arm_of(u, "r2", 20.0, 0.0) == "holdout" for u in users]
    mine = [arm_of(u, "r1", 20.0, 0.0) == "holdout" for u in users]
    assert other != mine
    # a user held out at 10 % stays held out at 20 % (shares are prefixes of the buckets)
    assert all(arm_of(u, "r1", 20.0, 0.0) == "holdout"
               for u in users if arm_of(u, "r1", 10.0, 0.0) == "holdout")
    # nothing configured: everybody is treated
    assert {arm_of(u, "r1", 0.0, 0.0) for u in users} == {"treatment"}


@pytest.mark.parametrize("value", [-0.1, 50.01, 100, float("nan"), float("inf"), "5", True, None])
def test_holdout_out_of_range_is_refused(value: Any) -> None:
    with pytest.raises(ValueError, match="holdout"):
        check_holdout(value)


@pytest.mark.parametrize("value", [-1, 15.5, 50, float("nan"), "3", None])
def test_control_share_out_of_range_is_refused(value: Any) -> None:
    with pytest.raises(ValueError, match="control group"):
        check_control(value)
    assert check_control(15) == 15.0 and check_control(0) == 0.0 and check_holdout(50) == 50.0


# -- the delivery worker ------------------------------------------------------------------
@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def rig(request: pytest.FixtureRequest, tmp_path: Any, smtp_server: Any) -> Iterator[Rig]:
    r = make_rig(backend_settings(request, tmp_path, smtp_server.url))
    r.worker.arms = Arms(r.container.control, refresh_s=0.0)
    try:
        yield r
    finally:
        r.close()


SQLITE_ONLY = pytest.mark.parametrize("rig", ["sqlite"], indirect=True)


def add_rule(rig: Rig, key: str, holdout: float = 0.0, salt: str | None = None,
             version: int = 1) -> None:
    with rig.container.control.begin() as conn:
        if version == 1:
            conn.execute(rules.insert().values(key=key, version=1, enabled=True, status="active",
                                               created_at=T0, updated_at=T0))
        conn.execute(rule_versions.insert().values(
            key=key, version=version, name=key, group=None, priority=100, source="x",
            banner=None, email=None, examples=[], author=None, created_at=T0,
            holdout=holdout, salt=salt))


def episode(rig: Rig, uid: int, rule: str = "r1") -> dict[str, Any] | None:
    store = rig.container.shards.for_user(uid)
    with store.engine.connect() as conn:
        row = conn.execute(select(episodes).where(
            (episodes.c.user_id == uid) & (episodes.c.rule_key == rule))).first()
    return dict(row._mapping) if row is not None else None


def test_held_out_users_get_a_ghost_episode_and_nothing_else(rig: Rig, smtp_server: Any) -> None:
    add_rule(rig, "r1", holdout=50.0)
    users = list(range(BASE, BASE + 40))
    held = [u for u in users if in_share(bucket("r1", u), 50.0)]
    treated = [u for u in users if u not in held]
    assert held and treated
    rig.publish(*(enter(u, "r1", 1) for u in users))
    rig.drain()

    for u in held:
        assert rig.banners(u) == []
        assert rig.statuses(u) == {}  # no ledger claim: no e-mail, no push, no retry
        ep = episode(rig, u)
        assert ep is not None
        assert (ep["arm"], ep["episode"], ep["version"], ep["status"]) == (
            "holdout", 1, 1, "active")
        assert ep["as_of"].isoformat() == "2026-11-24" and ep["why"]["fields"]
    for u in treated:
        assert [b["id"] for b in rig.banners(u)] == ["r1.1"]
        assert rig.statuses(u) == {(u, "r1", 1, "email"): "sent"}
        assert episode(rig, u)["arm"] == "treatment"  # type: ignore[index]
    assert sorted(message_ids(smtp_server)) == sorted(f"<{u}.r1.1@kvadrupel>" for u in treated)
    assert rig.worker.outcomes[("any", "holdout")] == len(held)

    # redelivered, then the episode ends, then a new one: still nothing for the held out
    rig.publish(*(enter(u, "r1", 1) for u in held), *(exit_(u, "r1", 1) for u in held))
    rig.drain()
    assert all(episode(rig, u)["status"] == "ended" for u in held)  # type: ignore[index]
    rig.publish(*(enter(u, "r1", 2) for u in held))
    rig.drain()
    assert all(rig.banners(u) == [] and rig.statuses(u) == {} for u in held)
    assert all(episode(rig, u)["arm"] == "holdout" for u in held)  # type: ignore[index]
    assert len(smtp_server.messages) == len(treated)


@SQLITE_ONLY
def test_the_salt_reshuffles_and_a_version_keeps_its_own_holdout(rig: Rig) -> None:
    add_rule(rig, "r1", holdout=30.0)
    add_rule(rig, "r1", holdout=30.0, salt="r1/reshuffled", version=2)
    add_rule(rig, "r1", holdout=0.0, version=3)
    users = list(range(BASE, BASE + 300))
    assert rig.worker.arms is not None
    v1 = rig.worker.arms.arms([(u, "r1", 1) for u in users])
    v2 = rig.worker.arms.arms([(u, "r1", 2) for u in users])
    v3 = rig.worker.arms.arms([(u, "r1", 3) for u in users])
    assert v1 == [("holdout" if in_share(bucket("r1", u), 30.0) else "treatment") for u in users]
    assert v2 == [("holdout" if in_share(bucket("r1/reshuffled", u), 30.0) else "treatment")
                  for u in users]
    assert v1 != v2 and set(v3) == {"treatment"}
    # an unknown rule version holds nobody out
    assert rig.worker.arms.arm(BASE, "nope", 1) == "treatment"


@SQLITE_ONLY
def test_the_global_control_group_gets_nothing_from_any_rule(rig: Rig, smtp_server: Any) -> None:
    add_rule(rig, "r1")
    add_rule(rig, "r2", holdout=10.0)
    set_control_share(rig.container.control, 15, "test", T0)
    users = list(range(BASE, BASE + 60))
    control = [u for u in users if in_share(bucket(CONTROL_SALT, u), 15.0)]
    assert control
    rig.publish(*(enter(u, r, 1) for u in users for r in ("r1", "r2")))
    rig.drain()
    sent_to = {int(m.split(".")[0][1:]) for m in message_ids(smtp_server)}
    assert sent_to and not sent_to & set(control)
    for u in control:
        assert rig.banners(u) == [] and rig.statuses(u) == {}
        assert episode(rig, u, "r1")["arm"] == episode(rig, u, "r2")["arm"] == "control"  # type: ignore[index]


@SQLITE_ONLY
def test_retries_and_old_banners_of_users_moved_into_the_control_group_stop(
    rig: Rig, smtp_server: Any
) -> None:
    add_rule(rig, "r1")
    # users who will fall in a 15 % control group
    users = [u for u in range(BASE, BASE + 200) if in_share(bucket(CONTROL_SALT, u), 15.0)][:4]
    retrying, shown = users[0], users[1]
    smtp_server.refuse(451)
    rig.publish(enter(retrying, "r1", 1, banner=False))
    rig.drain()
    assert rig.statuses(retrying) == {(retrying, "r1", 1, "email"): "pending"}
    smtp_server.accept()
    rig.publish(enter(shown, "r1", 1, email=False))
    rig.drain()
    assert [b["id"] for b in rig.banners(shown)] == ["r1.1"]

    # the global control group grows to take them in
    set_control_share(rig.container.control, 15.0, "test", T0)
    rig.clock.advance(seconds=5)
    rig.worker.run_chores()
    row = rig.ledger.entries(retrying)[0]
    assert (row["status"], row["reason"]) == ("suppressed", "global control group")
    assert smtp_server.messages == []

    # their next episode is a ghost, and no banner of the last one stays behind
    rig.publish(exit_(shown, "r1", 1), enter(shown, "r1", 2))
    rig.publish(enter(shown, "r1", 3))  # without an exit first (redelivery, reordering)
    rig.drain()
    assert rig.banners(shown) == []
    assert episode(rig, shown)["arm"] == "control"  # type: ignore[index]


@SQLITE_ONLY
def test_the_control_share_is_stored_and_reread(rig: Rig) -> None:
    control = rig.container.control
    assert get_control_share(control) == 0.0
    with pytest.raises(ValueError):
        set_control_share(control, 16, "test", T0)
    assert set_control_share(control, 2.5, "test", T0) == 2.5
    assert get_control_share(control) == 2.5
    now = [0.0]
    arms = Arms(control, refresh_s=5.0, monotonic=lambda: now[0])
    assert arms.control_share() == 2.5
    set_control_share(control, 7, "test", T0)
    assert arms.control_share() == 2.5  # cached
    now[0] = 5.0
    assert arms.control_share() == 7.0


def test_held_out_users_get_no_push(tmp_path: Any, smtp_server: Any,
                                    receiver: PushReceiver) -> None:
    rig = make_rig(embedded_settings(tmp_path, smtp_url=smtp_server.url),
                   pusher=FcmPusher(receiver.account, endpoint=receiver.url, concurrency=4))
    rig.worker.arms = Arms(rig.container.control, refresh_s=0.0)
    try:
        add_rule(rig, "r1", holdout=50.0)
        users = list(range(BASE, BASE + 20))
        held = {u for u in users if in_share(bucket("r1", u), 50.0)}
        assert held and len(held) < len(users)
        rig.publish(*(enter(u, "r1", 1, email=False, push={"tokens": {"phone": f"tok-{u}"}})
                      for u in users))
        rig.drain()
        assert sorted(receiver.tokens_delivered()) == sorted(
            f"tok-{u}" for u in users if u not in held)
        assert all(rig.statuses(u) == {} for u in held)
        assert receiver.violations == []
    finally:
        rig.close()
