"""Goals on both setups (embedded; PostgreSQL shards + Kafka-protocol broker):
exposures per arm from real and ghost episodes, conversions counted by the nightly
run (a goal that becomes true by date alone: its horizon wakes the user) and by
ingest re-evaluation (a path only the goal reads), at most once per episode, never
after the window; the report endpoint adds every shard up."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from channels.goals import experiment_counts
from channels.holdouts import arm_of
from engine.messages import VERSION, UsersJob, encode
from kvadrupel.container import Container
from rules.models import RuleIn
from shards.schema import goal_exposures
from tests.engine.test_incremental import night
from tests.fixtures.waiting import wait_for
from tests.rules.test_goals import RULE
from tests.scheduler.helpers import AS_OF, AS_OF_MIDNIGHT, KINDS, TOKENS, make_settings

N = 240
ADMIN = {"Authorization": f"Bearer {TOKENS['admin_token']}"}
BASE = 5_100_000


@pytest.fixture(params=KINDS)
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Container]:
    c = Container(make_settings(request.param, request, tmp_path, range_target_users=300,
                                clock_start=AS_OF_MIDNIGHT))
    c.migrate()
    yield c
    c.close()


def rows(c: Container) -> dict[int, dict[str, Any]]:
    out = {}
    for store in c.shards.stores:
        with store.engine.connect() as conn:
            for r in conn.execute(select(goal_exposures)):
                out[int(r.user_id)] = dict(r._mapping)
    return out


def put(c: Container, docs: dict[int, dict[str, Any]]) -> None:
    for uid, doc in docs.items():
        c.shards.for_user(uid).put_profiles([(uid, doc)])


def test_conversions_are_counted_per_arm_by_nights_and_ingest(deployment: Container) -> None:
    c = deployment
    c.rules.create(RuleIn(key="renew", name="Renew", source=RULE, holdout=50.0,
                          banner={"title": "Renew your licence"}))
    users = list(range(BASE, BASE + N))
    expires = (AS_OF + timedelta(days=10)).isoformat()
    # a third renews by ingest on day 1, a third has a renewal dated day 3 (the nightly
    # run sees it come true by date), a third renews after the 14-day window
    by_ingest, by_night, too_late = users[0::3], users[1::3], users[2::3]
    docs = {u: {"user_id": u, "driver_license": {"expires_on": expires}} for u in users}
    for u in by_night:
        docs[u]["driver_license"]["renewed_on"] = (AS_OF + timedelta(days=3)).isoformat()
    for u in too_late:
        docs[u]["driver_license"]["renewed_on"] = (AS_OF + timedelta(days=20)).isoformat()
    put(c, docs)
    arm = {u: arm_of(u, "renew", 50.0, 0.0) for u in users}
    assert set(arm.values()) == {"treatment", "holdout"}

    stop = threading.Event()
    threads = [c.delivery_worker().start_thread(stop)]
    try:
        # Night 1: everybody enters; held-out users get ghost episodes; all are exposed
        assert night(c, AS_OF)["enters"] == N
        wait_for(lambda: len(rows(c)), "the exposures", until=lambda n: n == N, timeout=30)
        exp = rows(c)
        assert {u: r["arm"] for u, r in exp.items()} == arm
        assert all(r["converted_on"] is None and r["started_on"] == AS_OF and r["episode"] == 1
                   and r["version"] == 1 and r["variant"] is None for r in exp.values())
        assert all(c.shards.for_user(u).banners(u)[1] == [] for u in users
                   if arm[u] == "holdout")

        # Day 1, ingest: the renewal date is set; only the goal reads it, so the job
        # re-evaluates the rule because the goal's reads are the rule's
        day1 = AS_OF + timedelta(days=1)
        for u in by_ingest:
            docs[u]["driver_license"]["renewed_on"] = day1.isoformat()
        put(c, {u: docs[u] for u in by_ingest})
        ev = c.evaluator_worker().start_thread(stop)
        threads.append(ev)

        def job(uids: list[int], d: date) -> None:
            per: dict[int, list[int]] = {}
            for u in uids:
                per.setdefault(c.shards.router.shard_of(u), []).append(u)
            for shard, us in per.items():
                c.bus.publish(c.bus.topic("jobs"), encode(UsersJob(
                    v=VERSION, shard=shard, user_ids=us, as_of=d.isoformat(),
                    paths=[["driver_license.renewed_on"]] * len(us))))
            c.bus.flush()

        def converted() -> dict[int, date]:
            return {u: r["converted_on"] for u, r in rows(c).items() if r["converted_on"]}

        job(by_ingest, day1)
        wait_for(converted, "ingest conversions", until=lambda x: len(x) == len(by_ingest),
                 timeout=30)
        assert converted() == {u: day1 for u in by_ingest}
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)

    threads = [c.delivery_worker().start_thread(stop := threading.Event())]
    try:
        # Nights 2..4 (due mode): the renewals dated day 3 come true by date alone
        for d in range(2, 5):
            result = night(c, AS_OF + timedelta(days=d))
            assert result["mode"] == "due"
        day3 = AS_OF + timedelta(days=3)
        wait_for(lambda: len([1 for r in rows(c).values() if r["converted_on"]]),
                 "night conversions", until=lambda n: n == len(by_ingest) + len(by_night),
                 timeout=30)
        got = {u: r["converted_on"] for u, r in rows(c).items() if r["converted_on"]}
        assert got == {u: day1 for u in by_ingest} | {u: day3 for u in by_night}
        # A later full (verifying) night sees the goals hold again: still one conversion
        # per episode, on its first date; the renewals of day 20 are past the window
        night(c, AS_OF + timedelta(days=20), full=True)
        night(c, AS_OF + timedelta(days=21), full=True)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
    final = rows(c)
    assert {u: r["converted_on"] for u, r in final.items() if r["converted_on"]} == got
    assert len(final) == N  # nobody entered twice

    # The counts per arm, over every shard, and the report
    want: Counter[tuple[str, str | None]] = Counter((arm[u], None) for u in users)
    conv: Counter[tuple[str, str | None]] = Counter((arm[u], None) for u in got)
    assert experiment_counts(c.shards.stores, "renew") == {
        k: (want[k], conv[k]) for k in want}
    with TestClient(create_app(c)) as client:
        assert client.get("/v1/rules/renew/experiment").status_code == 401
        r = client.get("/v1/rules/renew/experiment", headers=ADMIN)
        assert r.status_code == 200, r.text
        rep = r.json()
        assert client.get("/v1/rules/nope/experiment", headers=ADMIN).status_code == 404
    by_arm = {a["arm"]: a for a in rep["by_arm"]}
    for a in ("treatment", "holdout"):
        assert (by_arm[a]["exposed"], by_arm[a]["converted"]) == (want[(a, None)],
                                                                 conv[(a, None)])
        lo, hi = by_arm[a]["ci"]
        assert lo <= by_arm[a]["rate"] <= hi
    assert by_arm["control"]["exposed"] == 0
    assert rep["goal"] == {"window_days": 14}
    analysis = rep["analysis"]
    treated = next(x for x in analysis["arms"] if not x["control"])
    untreated = next(x for x in analysis["arms"] if x["control"])
    assert (treated["exposed"], untreated["exposed"]) == (want[("treatment", None)],
                                                          want[("holdout", None)])
    (comp,) = analysis["comparisons"]
    diff = treated["converted"] / treated["exposed"] - untreated["converted"] / untreated["exposed"]
    assert comp["absolute_uplift"]["value"] == pytest.approx(diff)
    assert analysis["srm"]["flagged"] is False  # a 50 % hash split of 240 users
    assert rep["verdict"] == analysis["verdict"] and rep["verdict"]
    assert rep["engagement"]["holdout"] == {"impressions": 0, "clicks": 0, "ctr": None}
