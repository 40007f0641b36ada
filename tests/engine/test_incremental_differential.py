"""The differential proof of incremental evaluation (issue 16), on both setups.

Two deployments with the same users and rules live through the same 400 nights
with the same random profile events between them. One is incremental: ingest
re-evaluates the changed users for the rules whose read-set meets the changed
paths, and each night evaluates only the users due in the wake-up index. Its
twin evaluates every user with every rule every night. After every night the
stored answers are equal, and at the end so are the e-mails (enters with an
e-mail) the two sent, and the conversions of the rules' goals (the first per episode,
with its date). The as-of dates run day by day, then jump forward by
months and back (a replay).

The nights are driven synchronously (the evaluator's own range and users jobs,
called in order) so that 400 of them stay short; the messages still go through
the deployment's bus and the data through its shard stores.
"""

from __future__ import annotations

import random
import sys
from collections import Counter
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest

from engine.evaluate.worker import EvaluatorWorker
from engine.messages import VERSION, UsersJob
from kvadrupel.container import Container
from kvadrupel.demo import install_pack
from kvadrupel.synthetic import users
from rules.pack import BUILTIN_RULES
from rules.readset import event_paths
from scheduler.planner import start_run
from tests.fixtures.waiting import scaled
from tests.scheduler.helpers import AS_OF, AS_OF_MIDNIGHT, KINDS, drain_results, make_settings

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from rules50 import RULES50  # noqa: E402

N = 150
NIGHTS = 400

# Rules that read ctx.today directly: parts, ordinals, comparisons, arithmetic, formatting.
TODAY_RULES = [
    ("season", "return ctx.today.month == 12 and ctx.today.day >= 20"),
    ("weekday-email", "return ctx.today.weekday() == 5 and has(profile, 'email')"),
    ("ordinal-mod", "return ctx.today.toordinal() % 9 == get(profile, 'orders.total', 0) % 9"),
    ("year-in-expiry",
     "return str(ctx.today.year) in str(get(profile, 'driver_license.expires_on', ''))"),
    ("months-to-expiry",
     "d = date(get(profile, 'vehicle.registration_expires_on'))\n"
     "if d is None:\n    return False\n"
     "return (d.year - ctx.today.year) * 12 + d.month - ctx.today.month <= 2"),
    ("days-since-issue",
     "d = date(get(profile, 'passport.issued_on'))\n"
     "return d is not None and (ctx.today - d).days % 365 < 20"),
    ("window", "return add_days(ctx.today, 45) >= (date(get(profile, 'driver_license.expires_on'))"
               " or ctx.today) > ctx.today"),
]


# Rules with goals (rules/goals.py): one a profile change makes true (the renewal
# date, read only by the goal), one the date alone (days since the last order), one
# both; their conversions must be the same in both twins.
GOAL_RULES = [
    ("goal-renewed", "GOAL_WINDOW_DAYS = 20\n\n"
     "def match(profile, ctx):\n"
     "    left = days_until(get(profile, 'driver_license.expires_on'), ctx)\n"
     "    return left is not None and 0 <= left <= 45\n\n"
     "def goal(profile, ctx):\n"
     "    return has(profile, 'driver_license.renewed_on')\n"),
    ("goal-quiet", "GOAL_WINDOW_DAYS = 60\n\n"
     "def match(profile, ctx):\n"
     "    return get(profile, 'orders.total', 0) >= 3\n\n"
     "def goal(profile, ctx):\n"
     "    since = days_since(get(profile, 'orders.last_at'), ctx)\n"
     "    return since is not None and since >= 30\n"),
    ("goal-later", "GOAL_WINDOW_DAYS = 365\n\n"
     "def match(profile, ctx):\n"
     "    d = date(get(profile, 'vehicle.registration_expires_on'))\n"
     "    return d is not None and d < ctx.today\n\n"
     "def goal(p, ctx):\n"
     "    left = days_until(get(p, 'driver_license.expires_on'), ctx)\n"
     "    return left is not None and left > 60\n"),
]


def _rules() -> list[dict[str, Any]]:
    extra = [{"key": k, "name": k, "source": "def match(profile, ctx):\n"
              + "".join(f"    {ln}\n" for ln in body.splitlines())} for k, body in TODAY_RULES]
    goals = [{"key": k, "name": k, "source": src} for k, src in GOAL_RULES]
    return [*BUILTIN_RULES, *RULES50, *extra, *goals]


def _conversions(results: list[dict[str, Any]]) -> dict[tuple[int, str, int], str]:
    """(user, rule, episode) -> the as-of date of its first conversion, in message
    order: what the delivery worker records (channels/goals.py)."""
    out: dict[tuple[int, str, int], str] = {}
    for r in results:
        if r["kind"] == "goal":
            out.setdefault((r["user_id"], r["rule"], r["episode"]), r["as_of"])
    return out


def _event(rng: random.Random, uid: int, day: date) -> dict[str, Any]:
    """A random profile event of the kinds the rules read (and some they do not)."""
    iso = (day + timedelta(days=rng.randint(-400, 400))).isoformat()
    choices = [
        {"set": {"driver_license": {"expires_on": iso}}},
        {"set": {"driver_license.renewed_on": day.isoformat()}},
        {"set": {"vehicle": {"registration_expires_on": iso}}},
        {"set": {"passport": {"issued_on": iso}}},
        {"set": {"birth_date": (day - timedelta(days=rng.randint(6000, 30000))).isoformat()}},
        {"inc": {"orders.total": rng.randint(1, 3)}},
        {"unset": ["email"]},
        {"set": {"email": f"u{uid}@example.org"}},
        {"set": {"nickname": f"n{rng.randint(0, 9)}"}},
    ]
    return rng.choice(choices)


def _apply(doc: dict[str, Any], ops: dict[str, Any]) -> None:
    from engine.ingest.events import apply_event
    from engine.messages.event import parse_event

    apply_event(doc, parse_event({"event_id": "x", "user_id": 1, **ops}))


def _states(c: Container) -> dict[int, frozenset[str]]:
    out = {}
    for store in c.shards.stores:
        for chunk in store.stream_range(1, 2**63 - 1):
            for row in chunk:
                out[row.user_id] = frozenset(k for k, v in row.state.items() if v[1])
    return out


def _night(c: Container, worker: EvaluatorWorker, as_of: date, incremental: bool) -> dict[str, Any]:
    run_id = start_run(c.shards, c.runs, _NoBus(), as_of, 10**6,
                       active=c.rules.active_versions() if incremental else None,
                       verify_every_days=10**6)
    for job in c.runs.jobs(run_id):
        worker.run_range(job)
    worker.bus.flush()
    return c.runs.get(run_id)


def _counting(publish: Any, topic: str, counts: list[int], i: int) -> Any:
    def counted(t: str, value: bytes, key: bytes | None = None) -> None:
        if t == topic:
            counts[i] += 1
        publish(t, value, key=key)

    return counted


class _NoBus:
    """Jobs are run in order by the test, not published (the results still go out)."""

    def topic(self, name: str) -> str:
        return name

    def publish(self, *_: Any, **__: Any) -> None:
        pass

    def flush(self, *_: Any) -> None:
        pass

    def partition_count(self, *_: Any) -> int:
        return 1

    def partition_of(self, *_: Any) -> int:
        return 0


# 800 nights (two twins x 400) in one test: the default 120 s per test is for ordinary
# tests; this one took 135 s (embedded) on this machine on a slow day
@pytest.mark.slow
@pytest.mark.timeout(scaled(600))
@pytest.mark.parametrize("kind", KINDS)
def test_incremental_nights_equal_full_nights_for_400_days(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    twins = []
    for name in ("incremental", "full"):
        c = Container(make_settings(kind, request, tmp_path / name, range_target_users=10**6,
                                    clock_start=AS_OF_MIDNIGHT))
        c.migrate()
        install_pack(c.rules, _rules())
        twins.append(c)
    inc, full = twins
    try:
        docs = dict(users(N, AS_OF, seed=11))
        for c in twins:
            for uid, doc in docs.items():
                c.shards.stores[c.shards.router.shard_of(uid)].put_profiles([(uid, doc)])
        workers = [c.evaluator_worker() for c in twins]
        published = [0, 0]  # results each twin published: what reading them back must find
        for i, w in enumerate(workers):
            w.bus.publish = _counting(w.bus.publish, w.results_topic, published, i)  # type: ignore[method-assign]
        rng = random.Random(2026)
        days = [AS_OF + timedelta(days=i) for i in range(NIGHTS - 20)]
        days += [days[-1] + timedelta(days=90 + i) for i in range(10)]   # months ahead
        days += [days[-1] - timedelta(days=200 - i) for i in range(10)]  # and back: a replay
        evaluated = []
        for day in days:
            # the day's events: the same profiles in both; ingest re-evaluates them in
            # the incremental twin only (its twin sees them at night)
            changed: dict[int, list[str]] = {}
            for uid in rng.sample(sorted(docs), k=rng.randint(0, 4)):
                ops = _event(rng, uid, day)
                _apply(docs[uid], ops)
                changed[uid] = event_paths(ops)
            for c in twins:
                for uid in changed:
                    c.shards.stores[c.shards.router.shard_of(uid)].put_profiles(
                        [(uid, docs[uid])])
            by_shard: dict[int, list[int]] = {}
            for uid in changed:
                by_shard.setdefault(inc.shards.router.shard_of(uid), []).append(uid)
            for shard, uids in by_shard.items():
                workers[0].run_users(UsersJob(v=VERSION, shard=shard, user_ids=uids,
                                              as_of=day.isoformat(),
                                              paths=[changed[u] for u in uids]))
            a = _night(inc, workers[0], day, incremental=True)
            b = _night(full, workers[1], day, incremental=False)
            assert a["status"] == b["status"] == "done"
            assert _states(inc) == _states(full), f"night {day}: answers differ"
            evaluated.append(a["users"])
        # The e-mails sent (enters that carry one) are the same, episode by episode
        results = [drain_results(c, n, timeout=120) for c, n in zip(twins, published, strict=True)]
        assert [len(r) for r in results] == published
        sent = [Counter((r["user_id"], r["rule"], r["episode"]) for r in rs
                        if r["kind"] == "enter" and r.get("email")) for rs in results]
        assert sent[0] == sent[1] and sum(sent[0].values()) > 0
        # and so are the conversions: the same episodes, first seen on the same date
        converted = [_conversions(rs) for rs in results]
        assert converted[0] == converted[1]
        assert {k[1] for k in converted[0]} == {k for k, _ in GOAL_RULES}
        # and the incremental twin evaluated far fewer users than everyone every night
        # (the jumps and the replay evaluate everyone; the 57 rules here include some
        # that depend on the weekday or format the date, which keep users due)
        share = sum(evaluated) / (N * len(days))
        print(f"incremental twin: {share:.1%} of the users evaluated per night on average")
        assert share < 0.6, evaluated
    finally:
        for c in twins:
            c.close()
