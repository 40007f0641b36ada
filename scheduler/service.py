"""The scheduler process: publishes the nightly run on a cron (APScheduler)."""

from __future__ import annotations

import logging
import threading
from datetime import date, datetime
from zoneinfo import ZoneInfo

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from scheduler.planner import start_run

log = logging.getLogger("kvadrupel.scheduler")


def today_in(tz: str) -> date:
    return datetime.now(ZoneInfo(tz)).date()


def run_scheduler(container, stop: threading.Event) -> int:  # noqa: ANN001
    s = container.settings
    sched = BackgroundScheduler(timezone=ZoneInfo(s.timezone))

    def nightly() -> None:
        as_of = today_in(s.timezone)
        run_id = start_run(container.shards, container.runs, container.bus, as_of, s.range_target_users)
        log.info("nightly run started", extra={"run_id": run_id, "as_of": as_of.isoformat()})

    sched.add_job(nightly, CronTrigger.from_crontab(s.nightly_cron, timezone=ZoneInfo(s.timezone)),
                  id="nightly", coalesce=True, misfire_grace_time=3600, max_instances=1)
    sched.start()
    log.info("scheduler started", extra={"cron": s.nightly_cron})
    stop.wait()
    sched.shutdown(wait=False)
    return 0
