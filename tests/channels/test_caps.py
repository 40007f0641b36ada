"""Frequency caps, quiet hours and preferences, with a controllable clock, on real
storage and a real SMTP server."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, time, timedelta
from typing import Any

import pytest

from channels.policy import ChannelPolicy, parse_quiet_hours
from channels.preferences import Preferences, merge_preferences, write_preferences
from tests.channels.deliverykit import (
    FakeClock,
    Rig,
    embedded_settings,
    enter,
    exit_,
    make_rig,
    make_worker,
    message_ids,
    pg_settings,
)

UID = 4_300_000_001


def _rig(request: pytest.FixtureRequest, tmp_path: Any, smtp: Any, policy: ChannelPolicy,
         clock: FakeClock | None = None) -> Rig:
    if getattr(request, "param", "sqlite") == "postgres":
        settings = pg_settings(
            tmp_path, request.getfixturevalue("pg_factory")(1), smtp_url=smtp.url
        )
    else:
        settings = embedded_settings(tmp_path, smtp_url=smtp.url)
    return make_rig(settings, policy=policy, clock=clock)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def capped(request: pytest.FixtureRequest, tmp_path: Any, smtp_server: Any) -> Iterator[Rig]:
    rig = _rig(request, tmp_path, smtp_server,
               ChannelPolicy(caps={"email": 2}, cap_window_s=86400, cap_policy="defer"))
    yield rig
    rig.close()


def test_cap_defers_over_the_limit_and_sends_when_the_window_frees(
    capped: Rig, smtp_server: Any
) -> None:
    rig = capped
    t0 = rig.clock.now
    rig.publish(*(enter(UID, f"r{i}", 1) for i in range(4)),
                enter(UID, "urgent", 1, critical=True))
    rig.drain()
    # two within the cap, the critical one exempt; two deferred, counted
    assert len(smtp_server.messages) == 3
    assert "urgent" in " ".join(message_ids(smtp_server))
    held = [e for e in rig.ledger.entries(UID) if e["status"] == "held"]
    assert len(held) == 2
    assert all(e["reason"] == "frequency cap: 2 email per day" for e in held)
    assert all(e["next_attempt_at"] == t0 + timedelta(days=1) for e in held)
    assert rig.worker.outcomes[("email", "deferred_cap")] == 2

    rig.clock.advance(hours=23)
    rig.worker.run_chores()
    assert len(smtp_server.messages) == 3  # still inside the window

    rig.clock.advance(hours=1)
    rig.worker.run_chores()
    assert len(smtp_server.messages) == 5  # the window moved: both go, none lost, none twice
    assert len(set(message_ids(smtp_server))) == 5
    assert set(rig.statuses(UID).values()) == {"sent"}

    # a sixth message the same day waits for the next free slot
    rig.publish(enter(UID, "r9", 1))
    rig.drain()
    (late,) = [e for e in rig.ledger.entries(UID) if e["status"] == "held"]
    assert late["next_attempt_at"] == rig.clock.now + timedelta(days=1)


def test_cap_drop_policy_drops_and_counts(tmp_path: Any, smtp_server: Any,
                                          request: pytest.FixtureRequest) -> None:
    rig = _rig(request, tmp_path, smtp_server,
               ChannelPolicy(caps={"email": 1}, cap_window_s=3600, cap_policy="drop"))
    try:
        rig.publish(enter(UID, "a", 1), enter(UID, "b", 1), enter(UID + 1, "b", 1))
        rig.drain()
        assert len(smtp_server.messages) == 2  # the cap is per user
        st = rig.statuses()
        assert sorted(st.values()) == ["dropped", "sent", "sent"]
        assert rig.worker.outcomes[("email", "dropped")] == 1
        assert rig.ledger.summary()["reasons"]["email"] == {"frequency cap: 1 email per hour": 1}
        rig.clock.advance(hours=2)
        rig.worker.run_chores()
        assert len(smtp_server.messages) == 2  # dropped is final
    finally:
        rig.close()


def test_quiet_hours_hold_until_the_window_opens_in_the_users_zone(
        tmp_path: Any, smtp_server: Any, request: pytest.FixtureRequest) -> None:
    # 23:30 in Moscow (20:30 UTC); Vladivostok is 07:30 the next morning there.
    clock = FakeClock(datetime(2026, 11, 24, 20, 30, tzinfo=UTC))
    rig = _rig(request, tmp_path, smtp_server,
               ChannelPolicy(caps={}, quiet=parse_quiet_hours("22:00-08:00")), clock)
    moscow, vlad, lisbon = UID, UID + 1, UID + 2
    try:
        rig.publish(enter(moscow, "r1", 1),                           # default zone: Moscow
                    enter(vlad, "r1", 1, tz="Asia/Vladivostok"),      # 07:30: quiet
                    enter(lisbon, "r1", 1, tz="Europe/Lisbon"))       # 20:30: not quiet
        rig.drain()
        assert message_ids(smtp_server) == [f"<{lisbon}.r1.1@kvadrupel>"]
        rig.worker.close()  # a restart meanwhile: held messages live in the ledger

        rig.worker = make_worker(rig.container, rig.ledger, rig.worker.mailer.__class__(
            smtp_server.url, "K <k@k.test>", timeout=5), clock,
            ChannelPolicy(caps={}, quiet=parse_quiet_hours("22:00-08:00")))
        clock.set(datetime(2026, 11, 24, 21, 59, tzinfo=UTC))  # 07:59 in Vladivostok
        rig.worker.run_chores()
        assert len(smtp_server.messages) == 1
        clock.set(datetime(2026, 11, 24, 22, 0, tzinfo=UTC))  # 08:00 in Vladivostok
        rig.worker.run_chores()
        assert message_ids(smtp_server)[1:] == [f"<{vlad}.r1.1@kvadrupel>"]
        clock.set(datetime(2026, 11, 25, 4, 59, tzinfo=UTC))  # 07:59 in Moscow
        rig.worker.run_chores()
        assert len(smtp_server.messages) == 2
        clock.set(datetime(2026, 11, 25, 5, 0, tzinfo=UTC))  # 08:00 in Moscow
        rig.worker.run_chores()
        assert sorted(message_ids(smtp_server)) == sorted(
            f"<{u}.r1.1@kvadrupel>" for u in (moscow, vlad, lisbon))
    finally:
        rig.close()


def test_preferences_opt_outs_are_respected_by_every_channel(
        tmp_path: Any, smtp_server: Any, request: pytest.FixtureRequest) -> None:
    rig = _rig(request, tmp_path, smtp_server,
               ChannelPolicy(caps={}, quiet=parse_quiet_hours("22:00-08:00")))
    shards = rig.container.shards
    no_mail, no_news, no_news_banner, held = UID, UID + 1, UID + 2, UID + 3
    write_preferences(shards, no_mail, {"channels": {"email": False}})
    write_preferences(shards, no_news, {"categories": {"news": False}})
    write_preferences(shards, no_news_banner, {"channel_categories": {"banner": {"news": False}}})
    try:
        rig.publish(enter(no_mail, "r1", 1), enter(no_news, "n1", 1, category="news"),
                    enter(no_news, "d1", 1, category="documents"),
                    enter(no_news_banner, "n1", 1, category="news"))
        rig.drain()
        assert sorted(message_ids(smtp_server)) == sorted(
            [f"<{no_news}.d1.1@kvadrupel>", f"<{no_news_banner}.n1.1@kvadrupel>"])
        st = rig.statuses()
        assert st[(no_mail, "r1", 1, "email")] == "suppressed"
        assert st[(no_news, "n1", 1, "email")] == "suppressed"
        assert [b["rule"] for b in rig.banners(no_mail)] == ["r1"]  # only e-mail was refused
        assert [b["rule"] for b in rig.banners(no_news)] == ["d1"]  # news: no channel at all
        assert rig.banners(no_news_banner) == []
        reasons = rig.ledger.summary()["reasons"]["email"]
        assert reasons == {"opted out of email": 1, "opted out of category news": 1}

        # an opt-out also stops a message that is already held (quiet hours)
        rig.clock.set(datetime(2026, 11, 24, 20, 0, tzinfo=UTC))  # 23:00 in Moscow
        rig.publish(enter(held, "r1", 1))
        rig.drain()
        assert rig.statuses(held) == {(held, "r1", 1, "email"): "held"}
        merge_preferences(shards, held, {"channel_categories": {"email": {"general": False}}})
        rig.clock.set(datetime(2026, 11, 25, 5, 0, tzinfo=UTC))
        rig.worker.run_chores()
        assert rig.statuses(held) == {(held, "r1", 1, "email"): "suppressed"}
        assert len(smtp_server.messages) == 2
    finally:
        rig.close()


def test_exit_during_quiet_hours_cancels_the_held_message(
        tmp_path: Any, smtp_server: Any, request: pytest.FixtureRequest) -> None:
    clock = FakeClock(datetime(2026, 11, 24, 20, 0, tzinfo=UTC))
    rig = _rig(request, tmp_path, smtp_server,
               ChannelPolicy(caps={}, quiet=parse_quiet_hours("22:00-08:00")), clock)
    try:
        rig.publish(enter(UID, "r1", 1))
        rig.drain()
        rig.publish(exit_(UID, "r1", 1))
        rig.drain()
        clock.set(datetime(2026, 11, 25, 6, 0, tzinfo=UTC))
        rig.worker.run_chores()
        assert rig.statuses(UID) == {(UID, "r1", 1, "email"): "cancelled"}
        assert smtp_server.messages == []
    finally:
        rig.close()


# -- the policy alone ---------------------------------------------------------------------

def test_quiet_until_handles_windows_zones_dst_and_spread() -> None:
    p = ChannelPolicy(caps={}, quiet=parse_quiet_hours("22:00-08:00"))
    at = datetime(2026, 11, 24, 18, 59, tzinfo=UTC)  # 21:59 Moscow
    assert p.quiet_until(at, None, 1) is None
    assert p.quiet_until(at + timedelta(minutes=1), None, 1) == datetime(
        2026, 11, 25, 5, 0, tzinfo=UTC
    )
    assert p.quiet_until(datetime(2026, 11, 25, 2, 0, tzinfo=UTC), None, 1) == datetime(
        2026, 11, 25, 5, 0, tzinfo=UTC)  # 05:00 Moscow: until 08:00 the same day
    # Berlin's clocks go forward on 29 March 2026: 08:00 CEST is 06:00 UTC
    assert p.quiet_until(datetime(2026, 3, 28, 23, 0, tzinfo=UTC), "Europe/Berlin", 1) == datetime(
        2026, 3, 29, 6, 0, tzinfo=UTC)
    day = ChannelPolicy(caps={}, quiet=parse_quiet_hours("13:00-14:00"))
    assert day.quiet_until(datetime(2026, 11, 24, 10, 30, tzinfo=UTC), None, 1) == datetime(
        2026, 11, 24, 11, 0, tzinfo=UTC)
    spread = ChannelPolicy(caps={}, quiet=(time(22), time(8)), quiet_spread_s=900)
    opens = {spread.quiet_until(at + timedelta(minutes=1), None, u) for u in range(1, 200)}
    base = datetime(2026, 11, 25, 5, 0, tzinfo=UTC)
    assert len(opens) > 50 and all(base <= o < base + timedelta(seconds=900) for o in opens)
    assert parse_quiet_hours("") is None
    with pytest.raises(ValueError):
        parse_quiet_hours("10pm-8am")


def test_preferences_allows() -> None:
    p = Preferences.of({"channels": {"push": False, "email": True},
                        "categories": {"marketing": False},
                        "channel_categories": {"email": {"news": False}}, "junk": 1})
    assert p.allows("email", "documents") == (True, None)
    assert p.allows("push", "documents")[0] is False
    assert p.allows("banner", "marketing") == (False, "opted out of category marketing")
    assert p.allows("email", "news") == (False, "opted out of news by email")
    assert p.allows("banner", "news") == (True, None)
