"""Evaluate only what can have changed (issue 16), on both setups.

Nights read only the users due in the wake-up index; a new, changed or removed rule
is swept over everyone alone; a verifying pass finds no mismatch; a replay of an
earlier date evaluates in full; ingest re-evaluates only the rules whose read-set
meets the changed paths."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from kvadrupel.container import Container
from kvadrupel.demo import install_pack
from rules.models import RuleIn
from rules.pack import BUILTIN_RULES
from scheduler.planner import start_run
from shards.store import StateWrite
from tests.engine.test_evaluator import expected_matches
from tests.scheduler.helpers import AS_OF, AS_OF_MIDNIGHT, KINDS, load_users, make_settings

N = 600


@pytest.fixture(params=KINDS)
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Container]:
    c = Container(make_settings(request.param, request, tmp_path, range_target_users=300,
                                clock_start=AS_OF_MIDNIGHT))
    c.migrate()
    install_pack(c.rules, BUILTIN_RULES)
    yield c
    c.close()


def night(c: Container, as_of: Any, **kw: Any) -> dict[str, Any]:
    stop = threading.Event()
    threads = [c.evaluator_worker().start_thread(stop)]
    try:
        run_id = start_run(c.shards, c.runs, c.bus, as_of, 300,
                           active=c.rules.active_versions(), **kw)
        return c.runs.wait(run_id, timeout=90)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)


def active_states(c: Container) -> Counter[str]:
    out: Counter[str] = Counter()
    for store in c.shards.stores:
        for chunk in store.stream_range(1, 2**63 - 1):
            for row in chunk:
                out.update(k for k, v in row.state.items() if v[1])
    return out


def test_nights_evaluate_only_what_can_have_changed(deployment: Container) -> None:
    c = deployment
    docs = load_users(c, N)

    # The first night evaluates everyone (nothing is known yet)
    first = night(c, AS_OF)
    assert first["status"] == "done" and first["mode"] == "full" and first["users"] == N
    assert active_states(c) == expected_matches(c, docs, AS_OF)

    # The same date again: nobody is due (every horizon lies after it)
    again = night(c, AS_OF)
    assert again["mode"] == "due" and again["users"] == 0 and again["skipped"] == N
    assert again["enters"] == again["exits"] == 0

    # A new rule: swept over everyone alone; the others are not evaluated again
    c.rules.create(RuleIn(key="has-email", name="has e-mail",
                          source="def match(profile, ctx):\n    return has(profile, 'email')\n"))
    swept = night(c, AS_OF)
    assert swept["mode"] == "due" and swept["sweep"] == ["has-email"]
    assert swept["swept"] == N and swept["users"] == 0
    with_email = sum(1 for d in docs.values() if "email" in d)
    assert swept["enters"] == with_email and active_states(c)["has-email"] == with_email

    # The rule is disabled: it exits exactly where it was active, nowhere else changes
    c.rules.set_enabled("has-email", False)
    gone = night(c, AS_OF)
    assert gone["sweep"] == ["has-email"] and gone["exits"] == with_email
    assert "has-email" not in active_states(c)

    # A verifying pass a week later finds every stored answer right
    later = AS_OF + timedelta(days=7)
    checked = night(c, later, full=True)
    assert checked["mode"] == "verify" and checked["mismatches"] == 0
    assert active_states(c) == expected_matches(c, docs, later)

    # A replay of an earlier date evaluates everyone (their states are for a later date)
    replay = night(c, AS_OF)
    assert replay["users"] == N
    assert active_states(c) == expected_matches(c, docs, AS_OF)


def test_a_verifying_pass_counts_and_corrects_what_the_index_missed(
        deployment: Container) -> None:
    c = deployment
    docs = load_users(c, N)
    assert night(c, AS_OF)["mode"] == "full"
    # Given a user whose stored state is wrong and who is not due (as if a horizon
    # had been later than the truth)
    uid = next(u for u, d in docs.items() if expected_matches(c, {u: d}, AS_OF))
    store = c.shards.stores[c.shards.router.shard_of(uid)]
    store.save_state([StateWrite(uid, {}, AS_OF, AS_OF + timedelta(days=300))])
    # When a verifying night runs / Then it finds the mismatch and corrects it
    checked = night(c, AS_OF, full=True)
    assert checked["mismatches"] == len(expected_matches(c, {uid: docs[uid]}, AS_OF))
    assert active_states(c) == expected_matches(c, docs, AS_OF)


def test_ingest_re_evaluates_only_the_rules_that_read_what_changed(
        deployment: Container) -> None:
    from engine.messages import VERSION, UsersJob, encode
    from tests.fixtures.waiting import wait_for

    c = deployment
    docs = load_users(c, 50)
    assert night(c, AS_OF)["users"] == 50
    uid = next(u for u, d in docs.items() if not expected_matches(c, {u: d}, AS_OF))
    store = c.shards.stores[c.shards.router.shard_of(uid)]
    # Given the user's birth date moved to today's anniversary behind the engine's back
    doc = dict(docs[uid], birth_date=AS_OF.replace(year=1990).isoformat())
    store.put_profiles([(uid, doc)])

    def user_rules() -> set[str]:
        return {k for ch in store.stream_users([uid]) for r in ch
                for k, v in r.state.items() if v[1]}

    def job(paths: list[str] | None) -> None:
        c.bus.publish(c.bus.topic("jobs"), encode(UsersJob(
            v=VERSION, shard=store.index, user_ids=[uid], as_of=AS_OF.isoformat(),
            paths=[paths])))
        c.bus.flush()

    stop = threading.Event()
    threads = [c.evaluator_worker().start_thread(stop)]
    try:
        # When ingest reports a change of the orders only: no rule that reads the birth
        # date runs, so the birthday is not seen yet (the evaluator says why it skipped)
        def skipped() -> float:
            return REGISTRY.get_sample_value("kvadrupel_evaluated_users_total",
                                             {"job": "unaffected"}) or 0.0

        before = skipped()
        job(["orders.total"])
        job(["vehicle.plate"])
        wait_for(skipped, "both jobs skipped as unaffected", until=lambda n: n >= before + 2)
        assert "birthday" not in user_rules()
        # When the birth date is reported changed / Then the birthday rule enters
        job(["birth_date"])
        wait_for(user_rules, "the birthday rule to enter", until=lambda r: "birthday" in r)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
