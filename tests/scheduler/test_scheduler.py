"""The scheduler: cron, persistent jobs, catch-up policy, campaigns, replicas."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select, text

from kvadrupel.container import Container
from kvadrupel.demo import install_pack
from kvadrupel.settings import Settings
from rules.pack import BUILTIN_RULES
from scheduler.campaigns import CampaignService
from scheduler.cron import cron_trigger, last_fire_time
from scheduler.service import SchedulerService
from shards.schema import runs as runs_table
from tests.fixtures.procs import stop_all
from tests.fixtures.waiting import wait_for
from tests.scheduler.helpers import TOKENS

TZ = "Europe/Moscow"
ROOT = Path(__file__).resolve().parents[2]


def test_cron_weekdays_follow_crontab() -> None:
    tz = ZoneInfo(TZ)
    start = datetime(2026, 11, 21, 12, 0, tzinfo=tz)  # a Saturday
    for expr, want in [("0 2 * * 1", date(2026, 11, 23)),  # Monday
                       ("0 2 * * 0", date(2026, 11, 22)),  # Sunday
                       ("0 2 * * 7", date(2026, 11, 22)),
                       ("0 2 * * 1-5", date(2026, 11, 23)),
                       ("0 2 * * 0-1", date(2026, 11, 22)),
                       ("0 2 * * sat", date(2026, 11, 28))]:
        t = cron_trigger(expr, TZ).get_next_fire_time(None, start)
        assert t.date() == want and (t.hour, t.minute) == (2, 0), expr
    with pytest.raises(ValueError):
        cron_trigger("0 2 * *", TZ)


def test_last_fire_time_is_the_latest_within_the_window() -> None:
    tz = ZoneInfo(TZ)
    now = datetime(2026, 11, 24, 7, 30, tzinfo=tz)
    nightly = cron_trigger("0 2 * * *", TZ)
    assert last_fire_time(nightly, now, 6 * 3600) == datetime(2026, 11, 24, 2, 0, tzinfo=tz)
    assert last_fire_time(nightly, now, 3600) is None
    every2 = cron_trigger("*/2 * * * * *", TZ)
    assert last_fire_time(every2, now + timedelta(seconds=3), 60) == now + timedelta(seconds=2)


# -- in-process scheduler on an embedded deployment ---------------------------------

def settings_for(tmp_path: Path, **kw: object) -> Settings:
    base: dict[str, object] = {"data_dir": tmp_path / "data", "timezone": TZ,
                               "nightly_cron": "*/2 * * * * *", "scheduler_poll_s": 0.2,
                               "scheduler_catchup_s": 60, **TOKENS}
    return Settings(**{**base, **kw})


class Replica:
    """A SchedulerService in a thread, with its own container (as a process would)."""

    def __init__(self, settings: Settings) -> None:
        self.container = Container(settings)
        self.service = SchedulerService(self.container)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.service.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.container.close()


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[Settings]:
    s = settings_for(tmp_path)
    c = Container(s)
    c.migrate()
    c.close()
    yield s


def fired(c: Container) -> list[tuple[str, date, str]]:
    with c.control.connect() as conn:
        return [(r.fire_key, r.as_of, r.kind) for r in conn.execute(
            select(runs_table).where(runs_table.c.fire_key.is_not(None)).order_by(runs_table.c.id))]


def key_time(key: str) -> datetime:
    return datetime.fromisoformat(key.split("@", 1)[1])


def test_nightly_fires_on_its_cron_as_of_the_scheduled_date(embedded: Settings) -> None:
    r = Replica(embedded)
    try:
        wait_for(lambda: fired(r.container), "two nightly firings (runs fired)",
                 until=lambda runs: len(runs) >= 2)
        runs = fired(r.container)
        assert all(k.startswith("nightly@") and kind == "nightly" for k, _, kind in runs)
        assert all(as_of == key_time(k).date() for k, as_of, _ in runs)
        assert all(key_time(k).second % 2 == 0 for k, _, _ in runs)
        assert len({k for k, _, _ in runs}) == len(runs)
    finally:
        r.close()


def test_a_run_missed_while_down_is_caught_up_once(embedded: Settings) -> None:
    # Given the scheduler ran, then was down for several firings
    r = Replica(embedded)
    wait_for(lambda: fired(r.container), "a nightly firing (runs fired)",
             until=lambda runs: len(runs) >= 1)
    r.close()
    down_at = datetime.now(UTC)
    time.sleep(4.5)
    up_at = datetime.now(UTC)
    # When it starts again (catch-up window 60 s)
    r = Replica(embedded)
    try:
        wait_for(lambda: fired(r.container), "a run for the firings missed while down (runs fired)",
                 until=lambda runs: any(down_at < key_time(k) < up_at for k, _, _ in runs),
                 timeout=5)
        # Then exactly one run stands for the missed firings: the latest of them
        missed = [k for k, _, _ in fired(r.container) if down_at < key_time(k) < up_at]
        assert len(missed) == 1
        assert up_at - key_time(missed[0]) < timedelta(seconds=2.5)
    finally:
        r.close()


def test_a_run_missed_beyond_the_window_is_skipped(tmp_path: Path) -> None:
    s = settings_for(tmp_path, scheduler_catchup_s=1)
    c = Container(s)
    c.migrate()
    c.close()
    r = Replica(s)
    wait_for(lambda: fired(r.container), "a nightly firing (runs fired)",
             until=lambda runs: len(runs) >= 1)
    r.close()
    down_at = datetime.now(UTC)
    time.sleep(4.5)
    up_at = datetime.now(UTC)
    r = Replica(s)
    try:
        # Then nothing runs for the firings older than the window; the cron goes on
        wait_for(lambda: fired(r.container), "a firing after the restart (runs fired)",
                 until=lambda runs: any(key_time(k) > up_at for k, _, _ in runs), timeout=5)
        stale = [
            k
            for k, _, _ in fired(r.container)
            if down_at < key_time(k) < up_at - timedelta(seconds=1.5)
        ]
        assert stale == []
    finally:
        r.close()


def test_campaigns_fire_once_at_their_time_unless_cancelled_or_too_late(tmp_path: Path) -> None:
    s = settings_for(tmp_path, nightly_cron="off", scheduler_catchup_s=30)
    c = Container(s)
    c.migrate()
    install_pack(c.rules, BUILTIN_RULES)
    try:
        campaigns = CampaignService(c.control)
        now = datetime.now(UTC)
        soon = campaigns.create(now + timedelta(seconds=1), None, name="everyone")
        restricted = campaigns.create(now + timedelta(seconds=1.5), ["birthday"],
                                      as_of=date(2026, 12, 1))
        cancelled = campaigns.create(now + timedelta(seconds=1), ["birthday"])
        too_late = campaigns.create(now - timedelta(minutes=5), None)
        campaigns.cancel(cancelled["id"])
        r = Replica(s)
        try:
            wait_for(lambda: (campaigns.get(restricted["id"])["status"],
                              campaigns.get(soon["id"])["status"]),
                     "both due campaigns started (their statuses)",
                     until=lambda statuses: statuses == ("started", "started"))
            time.sleep(0.5)
            got = {k: (as_of, kind) for k, as_of, kind in fired(r.container)}
            assert got == {
                f"campaign:{soon['id']}": (datetime.fromisoformat(soon["at"]).astimezone(
                    ZoneInfo(TZ)).date(), "campaign"),
                f"campaign:{restricted['id']}": (date(2026, 12, 1), "campaign"),
            }
            run = c.runs.get(campaigns.get(restricted["id"])["run_id"])
            assert run["rules"] == ["birthday"] and run["kind"] == "campaign"
            assert campaigns.get(cancelled["id"])["status"] == "cancelled"
            assert campaigns.get(too_late["id"])["status"] == "missed"
            assert r.service.leading.is_set()
        finally:
            r.close()
    finally:
        c.close()


def test_a_second_embedded_scheduler_stands_by(embedded: Settings) -> None:
    a = Replica(embedded)
    wait_for(a.service.leading.is_set, "the first replica to lead")
    b = Replica(embedded)
    try:
        time.sleep(1.0)
        assert not b.service.leading.is_set()
        a.close()
        wait_for(b.service.leading.is_set, "the second replica to take over", timeout=5)
    finally:
        b.close()
        a.close()


# -- replicas as processes on PostgreSQL --------------------------------------------

@pytest.mark.postgres
@pytest.mark.kafka
def test_replicas_fire_each_job_exactly_once_and_fail_over(pg_factory, kafka_broker,  # noqa: ANN001
                                                           tmp_path: Path) -> None:
    dbs = pg_factory(1)
    env = {**os.environ, "KVADRUPEL_SHARDS": dbs.shards[0], "KVADRUPEL_CONTROL_DB": dbs.control,
           "KVADRUPEL_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
           "KVADRUPEL_KAFKA_TOPIC_PREFIX": f"t{os.getpid()}{int(time.time())}",
           "KVADRUPEL_DATA_DIR": str(tmp_path / "data"), "KVADRUPEL_NIGHTLY_CRON": "*/2 * * * * *",
           "KVADRUPEL_SCHEDULER_POLL_S": "0.3", "KVADRUPEL_SCHEDULER_CATCHUP_S": "60",
           "KVADRUPEL_TIMEZONE": TZ, "KVADRUPEL_LOG_LEVEL": "WARNING"}
    c = Container(Settings(shards=dbs.shards, control_db=dbs.control, data_dir=tmp_path / "data"))
    c.migrate()

    def leaders() -> list[int]:
        with c.control.connect() as conn:
            return list(
                conn.execute(
                    text(
                        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                        "AND objid = :k AND database = (SELECT oid FROM pg_database WHERE datname "
                        "= current_database())"
                    ),
                    {"k": 0x6B767363},
                ).scalars()
            )

    procs = [
        subprocess.Popen([sys.executable, "-m", "kvadrupel.cli", "scheduler"], env=env, cwd=ROOT)
        for _ in range(3)
    ]
    try:
        # Given three replicas
        wait_for(lambda: [k for k, _, _ in fired(c)], "three firings (keys fired)",
                 until=lambda keys: len(keys) >= 3, timeout=30)
        assert len(leaders()) == 1
        # When the leader is killed (its lock goes with its session)
        with c.control.connect() as conn:
            leader_backend = leaders()[0]
            client_port = conn.execute(
                text("SELECT client_port FROM pg_stat_activity WHERE pid = :p"),
                {"p": leader_backend},
            ).scalar()
        victim = next(p for p in procs if _owns_port(p.pid, client_port))
        before = len(fired(c))
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=10)
        # Then another replica leads and the cron goes on
        wait_for(leaders, f"one new leader, not backend {leader_backend} (lock holders)",
                 until=lambda pids: len(pids) == 1 and pids[0] != leader_backend, timeout=15)
        wait_for(lambda: [k for k, _, _ in fired(c)], f"{before + 3} firings (keys fired)",
                 until=lambda keys: len(keys) >= before + 3, timeout=20)
        keys = [k for k, _, _ in fired(c)]
        assert len(keys) == len(set(keys))  # every firing made one run
        assert Counter(key_time(k).second % 2 for k in keys) == {0: len(keys)}
    finally:
        stop_all(procs)
        c.close()


def _owns_port(pid: int, port: int) -> bool:
    """Whether process ``pid`` has a TCP socket bound to local ``port``."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if int(parts[1].rsplit(":", 1)[1], 16) == port and parts[9] in inodes:
                    return True
    return False
