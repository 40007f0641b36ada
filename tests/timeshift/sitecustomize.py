"""Move this Python process's wall clock for a time-shifted test run.

``scripts/test --shift-days N`` (or ``--at ISO-DATETIME``) puts this folder on
``PYTHONPATH`` and sets ``KVADRUPEL_TEST_SHIFT_DAYS`` / ``KVADRUPEL_TEST_AT``:
every Python process of the run (pytest and the workers it spawns) then starts
with its wall clock moved there by time-machine, ticking on from that instant.
Monotonic clocks are untouched, so timeouts behave as usual. Processes that are
not Python (PostgreSQL, the Tansu broker, Chromium) keep the real time: tests
must pin the dates they depend on (see README, "Testing").
"""

import os

_days = os.environ.get("KVADRUPEL_TEST_SHIFT_DAYS")
_at = os.environ.get("KVADRUPEL_TEST_AT")
if _days or _at:
    import datetime as _dt

    import time_machine as _tm

    if _at:
        _dest = _dt.datetime.fromisoformat(_at)
        if _dest.tzinfo is None:  # local wall time of this process (TZ)
            _dest = _dest.astimezone()
    else:
        _dest = _dt.datetime.now(_dt.UTC) + _dt.timedelta(days=int(_days or 0))
    _tm.travel(_dest, tick=True).start()
