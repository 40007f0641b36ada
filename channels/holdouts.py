"""Holdouts and the global control group: who is sent nothing, and which arm they are in.

Every episode that starts is in one of three *arms*:

* ``control`` — the user is in the installation's global control group: the first
  ``control_group`` % of the buckets of ``bucket(CONTROL_SALT, user)``
  (base/buckets.py; 0–15 %, default 0, set at run time in the control database's
  ``installation_settings``). Nothing from any rule reaches them.
* ``holdout`` — the rule version's ``holdout`` % (0–50 %, default 0) of the buckets
  of ``bucket(salt, user)``, where the salt is the rule's key unless an analyst
  reshuffles it. Nothing from that rule reaches them.
* ``treatment`` — everybody else: delivered as usual.

Held-out users (holdout and control) go through the same episode logic as everyone
else: the evaluator numbers their episodes, and the delivery worker records a *ghost*
episode (rule version, as-of date, why-data, ``arm``) but stores no banner and claims
no e-mail or push. That decision is made in one place, the delivery worker's handling
of an *enter* (engine/deliver/worker.py), which every path goes through — nightly
runs, campaigns, the ingest re-evaluation; retries come from ledger rows that only
treated episodes have, and are checked again before they are sent.

A version's holdout and salt are immutable (a change is a new version), so they are
cached per (rule, version) for the life of the process; the global share is re-read
every ``refresh_s`` seconds.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, and_, or_, select

from base.buckets import CONTROL_SALT, bucket, in_share
from shards.schema import installation_settings, rule_versions

__all__ = ["ARMS", "CONTROL_GROUP", "MAX_CONTROL", "MAX_HOLDOUT", "Arms", "arm_of",
           "check_control", "check_holdout", "get_control_share", "set_control_share"]

ARMS = ("treatment", "holdout", "control")
MAX_HOLDOUT = 50.0  # % of a rule's users
MAX_CONTROL = 15.0  # % of the installation's users
CONTROL_GROUP = "control_group"  # the installation_settings row


def _check(value: Any, top: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number of percent (0–{top:g})")
    pct = float(value)
    if not math.isfinite(pct) or not 0.0 <= pct <= top:
        raise ValueError(f"{what} must be between 0 and {top:g} %, not {value!r}")
    return pct


def check_holdout(value: Any) -> float:
    """A rule's holdout share in %, or ValueError (0–50)."""
    return _check(value, MAX_HOLDOUT, "holdout")


def check_control(value: Any) -> float:
    """The global control group's share in %, or ValueError (0–15)."""
    return _check(value, MAX_CONTROL, "the global control group")


def arm_of(user_id: int, salt: str, holdout: float, control: float) -> str:
    """``control``, ``holdout`` or ``treatment`` for this user (the global group first)."""
    if control > 0 and in_share(bucket(CONTROL_SALT, user_id), control):
        return "control"
    if holdout > 0 and in_share(bucket(salt, user_id), holdout):
        return "holdout"
    return "treatment"


# -- the global control group's share, in the control database ----------------------------
def get_control_share(control: Engine) -> float:
    with control.connect() as conn:
        value = conn.execute(select(installation_settings.c.value).where(
            installation_settings.c.name == CONTROL_GROUP)).scalar()
    try:
        return check_control(value.get("percent")) if isinstance(value, dict) else 0.0
    except ValueError:  # written by hand out of range: hold nobody back rather than guess
        return 0.0


def set_control_share(control: Engine, percent: Any, actor: str | None,
                      now: datetime) -> float:
    """Set the global control group's share (ValueError outside 0–15 %)."""
    pct = check_control(percent)
    with control.begin() as conn:
        done = conn.execute(installation_settings.update().where(
            installation_settings.c.name == CONTROL_GROUP).values(
            value={"percent": pct}, updated_by=actor, updated_at=now))
        if done.rowcount == 0:
            conn.execute(installation_settings.insert().values(
                name=CONTROL_GROUP, value={"percent": pct}, updated_by=actor, updated_at=now))
    return pct


class Arms:
    """Which arm a user's episode of a rule version is in, as the delivery worker asks."""

    def __init__(self, control: Engine, refresh_s: float = 5.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.control = control
        self.refresh_s = refresh_s
        self._monotonic = monotonic
        self._share = 0.0
        self._read_at: float | None = None
        # (rule, version) -> (holdout %, salt); versions are immutable
        self._versions: dict[tuple[str, int], tuple[float, str]] = {}
        self._lock = threading.Lock()

    def control_share(self) -> float:
        now = self._monotonic()
        if self._read_at is None or now - self._read_at >= self.refresh_s:
            self._share = get_control_share(self.control)
            self._read_at = now
        return self._share

    def _load(self, pairs: Iterable[tuple[str, int]]) -> None:
        missing = sorted({p for p in pairs if p not in self._versions})
        if not missing:
            return
        found: dict[tuple[str, int], tuple[float, str]] = {}
        with self.control.connect() as conn:
            for i in range(0, len(missing), 200):
                chunk = missing[i:i + 200]
                rows = conn.execute(select(
                    rule_versions.c.key, rule_versions.c.version, rule_versions.c.holdout,
                    rule_versions.c.salt,
                ).where(or_(*(and_(rule_versions.c.key == k, rule_versions.c.version == v)
                              for k, v in chunk)))).all()
                for r in rows:
                    found[(r.key, int(r.version))] = (float(r.holdout or 0.0), r.salt or r.key)
        with self._lock:
            for k, v in missing:
                # A version the control DB does not know (deleted, or another
                # installation's): holds nobody out.
                self._versions[(k, v)] = found.get((k, v), (0.0, k))

    def arms(self, items: Iterable[tuple[int, str, int]]) -> list[str]:
        """The arm of each ``(user_id, rule, version)``."""
        items = list(items)
        if not items:
            return []
        control = self.control_share()
        self._load((r, v) for _, r, v in items)
        out = []
        for uid, rule, version in items:
            holdout, salt = self._versions[(rule, version)]
            out.append(arm_of(uid, salt, holdout, control) if holdout or control
                       else "treatment")
        return out

    def arm(self, user_id: int, rule: str, version: int) -> str:
        return self.arms([(user_id, rule, version)])[0]
