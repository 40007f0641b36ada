"""The scheduler process (``kvadrupel scheduler``): the nightly cron and scheduled campaigns.

Any number of replicas may run; one leads (scheduler/leader.py) and runs an
APScheduler 3 ``BackgroundScheduler`` whose jobs live in the control database
(``SQLAlchemyJobStore``, table ``apscheduler_jobs``):

* ``nightly``: a cron job (``KVADRUPEL_NIGHTLY_CRON`` in ``KVADRUPEL_TIMEZONE``)
  that starts a run over every user, as of the date of its scheduled time;
* ``campaign-<id>``: a date job per scheduled campaign (scheduler/campaigns.py),
  mirrored from the ``campaigns`` table every ``scheduler_poll_s``.

Missed runs (policy, docs/scheduling.md). Because the jobs and their next run
times are stored, a scheduler that starts after being down sees what it missed:

* a firing missed by at most ``scheduler_catchup_s`` (default 6 h) runs at
  once, *once* however many were missed (coalesced), as of the date it was
  scheduled for — a nightly job due at 02:00 and caught up at 07:30 evaluates
  that day, not a later one;
* older ones are skipped (logged; a campaign is marked ``missed``): notifying
  people about a stale day is worse than skipping it. ``kvadrupel run-nightly
  --as-of`` runs one by hand.

Each firing has a key (``nightly@<scheduled time>``, ``campaign:<id>``) that the
runs table keeps unique, so a firing seen twice makes one run.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.date import DateTrigger

from scheduler.campaigns import CampaignService
from scheduler.cron import cron_trigger, last_fire_time, nightly_enabled
from scheduler.leader import Leadership, leadership_for
from scheduler.planner import republish, start_run

__all__ = ["SchedulerService", "fire_campaign", "fire_nightly", "run_scheduler"]

log = logging.getLogger("kvadrupel.scheduler")

# The replica leading in this process (at most one: leadership is exclusive).
# APScheduler stores jobs as references to module-level functions, which find it here.
_ACTIVE: SchedulerService | None = None
_FIRE_ATTEMPTS = 3


def fire_nightly(cron: str, tz: str) -> None:
    """APScheduler job: the nightly run (args are stored with the job)."""
    if _ACTIVE is None:
        log.error("nightly job fired with no scheduler leading in this process")
        return
    _ACTIVE.fire_nightly(cron, tz)


def fire_campaign(campaign_id: int) -> None:
    """APScheduler job: a scheduled campaign."""
    if _ACTIVE is None:
        log.error("campaign job fired with no scheduler leading in this process")
        return
    _ACTIVE.fire_campaign(campaign_id)


class SchedulerService:
    """One scheduler replica. ``run(stop)`` blocks: standby until it leads, then leads
    until ``stop`` is set or its leadership is lost (then back to standby)."""

    def __init__(self, container: Any, *, leadership: Leadership | None = None) -> None:
        s = container.settings
        self.container = container
        self.cron = s.nightly_cron
        self.tz = s.timezone
        self.catchup_s = s.scheduler_catchup_s
        self.poll_s = s.scheduler_poll_s
        self.target_users = s.range_target_users
        self.campaigns = CampaignService(container.control, container.clock)
        self.leadership = leadership or leadership_for(container.control)
        self.leading = threading.Event()
        self.fired: list[int] = []  # runs this replica made (logs, tests)

    # -- life cycle -----------------------------------------------------------
    def run(self, stop: threading.Event) -> int:
        waiting_logged = False
        while not stop.is_set():
            if self.leadership.acquire():
                waiting_logged = False
                try:
                    self._lead(stop)
                finally:
                    self.leadership.release()
            else:
                if not waiting_logged:
                    log.info("scheduler on standby: another replica leads")
                    waiting_logged = True
                stop.wait(self.poll_s)
        return 0

    def _lead(self, stop: threading.Event) -> None:
        global _ACTIVE
        sched = BackgroundScheduler(
            jobstores={"default": SQLAlchemyJobStore(engine=self.container.control,
                                                     tablename="apscheduler_jobs")},
            executors={"default": ThreadPoolExecutor(4)},
            job_defaults={"coalesce": True, "max_instances": 1,
                          "misfire_grace_time": self.catchup_s},
            timezone=ZoneInfo(self.tz),
        )
        # Paused: the stored jobs (and what they missed) are loaded but not run until
        # the nightly job is checked against the settings.
        sched.start(paused=True)
        _ACTIVE = self
        self.leading.set()
        log.info("scheduler leading", extra={"cron": self.cron, "catchup_s": self.catchup_s})
        try:
            self._install_nightly(sched)
            self._chores(sched)
            sched.resume()
            while not stop.wait(self.poll_s):
                if not self.leadership.alive():
                    log.error("scheduler: leadership lost, stepping down")
                    return
                self._chores(sched)
        finally:
            self.leading.clear()
            sched.shutdown(wait=False)
            if _ACTIVE is self:
                _ACTIVE = None

    def _install_nightly(self, sched: BackgroundScheduler) -> None:
        job = sched.get_job("nightly")
        if not nightly_enabled(self.cron):
            if job is not None:
                sched.remove_job("nightly")
            log.info("nightly run disabled (KVADRUPEL_NIGHTLY_CRON=%r)", self.cron)
            return
        args = (self.cron, self.tz)
        if job is not None and tuple(job.args) == args:
            # Keep it as stored: its next run time says what was missed while down.
            log.info("nightly job: next run %s", job.next_run_time)
            return
        sched.add_job(fire_nightly, cron_trigger(self.cron, self.tz), args=args, id="nightly",
                      name="nightly run", replace_existing=True)
        log.info("nightly job (re)scheduled: %s %s", self.cron, self.tz)

    def _chores(self, sched: BackgroundScheduler) -> None:
        try:
            self._sync_campaigns(sched)
            for run_id in republish(self.container.bus, self.container.runs, older_than_s=60.0):
                log.warning("re-published the jobs of run %d (its planner stopped early)", run_id)
        except Exception:  # noqa: BLE001 - a DB blip must not end the leadership
            log.exception("scheduler chores failed")

    def _sync_campaigns(self, sched: BackgroundScheduler) -> None:
        now = self.container.clock.now()
        jobs = {j.id for j in sched.get_jobs() if j.id.startswith("campaign-")}
        wanted: set[str] = set()
        for c in self.campaigns.with_status("scheduled", "starting"):
            if c["status"] == "starting":
                # A leader died between claiming it and recording its run; the run's
                # firing key makes finishing it here safe.
                if now - datetime.fromisoformat(c["updated_at"]) > timedelta(seconds=60):
                    self._complete_campaign(c)
                continue
            jid = f"campaign-{c['id']}"
            at = datetime.fromisoformat(c["at"])
            wanted.add(jid)
            if jid in jobs:
                continue
            late = now - at
            if late > timedelta(seconds=self.catchup_s):
                self.campaigns.missed(c["id"], late)
                log.warning("campaign %d missed by %s: not run", c["id"], late)
                continue
            sched.add_job(fire_campaign, DateTrigger(run_date=at), args=(c["id"],), id=jid,
                          name=c["name"], replace_existing=True)
        for jid in jobs - wanted:
            sched.remove_job(jid)  # cancelled (or finished by another path)

    # -- firing ---------------------------------------------------------------
    def fire_nightly(self, cron: str, tz: str) -> int | None:
        now = self.container.clock.local_now(tz)
        scheduled = last_fire_time(cron_trigger(cron, tz), now, self.catchup_s + 60) or now
        key = f"nightly@{scheduled.isoformat()}"
        return self._start(key, scheduled.date(), None, "nightly")

    def fire_campaign(self, campaign_id: int) -> int | None:
        c = self.campaigns.begin(campaign_id)
        if c is None:
            return None  # cancelled, or fired already
        return self._complete_campaign(c)

    def _complete_campaign(self, c: dict[str, Any]) -> int | None:
        if c["as_of"]:
            as_of = date.fromisoformat(c["as_of"])
        else:
            as_of = datetime.fromisoformat(c["at"]).astimezone(ZoneInfo(self.tz)).date()
        run_id = self._start(f"campaign:{c['id']}", as_of, c["rules"], "campaign")
        if run_id is None:
            self.campaigns.failed(c["id"], "the run could not be planned (see the scheduler log)")
        else:
            self.campaigns.started(c["id"], run_id)
        return run_id

    def _start(self, key: str, as_of: date, rules: list[str] | None, kind: str) -> int | None:
        c = self.container
        for attempt in range(1, _FIRE_ATTEMPTS + 1):
            try:
                incremental = c.settings.incremental and kind == "nightly" and rules is None
                run_id = start_run(c.shards, c.runs, c.bus, as_of, self.target_users,
                                   rules=rules, kind=kind, fire_key=key,
                                   active=c.rules.active_versions() if incremental else None,
                                   verify_every_days=c.settings.verify_every_days)
            except Exception:  # noqa: BLE001 - a shard or the bus down: try again shortly
                log.exception("%s: could not start the run (attempt %d)", key, attempt)
                time.sleep(min(30.0, 2.0 * attempt))
                continue
            self.fired.append(run_id)
            log.info("%s: run %d as of %s", key, run_id, as_of.isoformat())
            return run_id
        return None


def run_scheduler(container: Any, stop: threading.Event) -> int:
    return SchedulerService(container).run(stop)
