"""The evaluator worker on both setups: runs, redelivery, restricted runs, parked ranges."""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from kvadrupel.container import Container
from kvadrupel.demo import install_pack
from rules.context import make_context
from rules.pack import BUILTIN_RULES
from scheduler.planner import start_run
from shards.copytext import encode_rows
from tests.scheduler.helpers import (
    AS_OF,
    AS_OF_MIDNIGHT,
    KINDS,
    drain_results,
    load_users,
    make_settings,
)

N = 1_500


@pytest.fixture(params=KINDS)
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Container]:
    # The default rule budgets: they count CPU time, so two evaluator threads of one
    # process on a loaded CI machine, waiting for the GIL and the CPU, do not overrun.
    c = Container(make_settings(request.param, request, tmp_path, range_target_users=300,
                                clock_start=AS_OF_MIDNIGHT))
    c.migrate()
    install_pack(c.rules, BUILTIN_RULES)
    c.kind = request.param  # type: ignore[attr-defined]
    yield c
    c.close()


def start_evaluators(c: Container, n: int = 2) -> tuple[threading.Event, list[threading.Thread]]:
    stop = threading.Event()
    threads = [c.evaluator_worker(retry_backoff_s=0.05).start_thread(stop) for _ in range(n)]
    return stop, threads


def expected_matches(c: Container, docs: dict, as_of) -> Counter[str]:  # noqa: ANN001
    from engine.evaluate.evaluation import CompiledPack

    pack = CompiledPack(c.rules.active(), 0)
    ctx = make_context(as_of, c.settings.timezone)
    out: Counter[str] = Counter()
    for doc in docs.values():
        out.update(pack.resolve_groups(pack.ruleset.evaluate(doc, ctx).matched))
    return out


def test_a_run_evaluates_every_user_once_and_a_rerun_changes_nothing(deployment: Container) -> None:
    c = deployment
    docs = load_users(c, N)
    stop, threads = start_evaluators(c)
    try:
        # When a run is started
        run_id = start_run(c.shards, c.runs, c.bus, AS_OF, c.settings.range_target_users)
        info = c.runs.wait(run_id, timeout=60)
        # Then every user was evaluated once, with the reference matches
        want = expected_matches(c, docs, AS_OF)
        assert info["status"] == "done" and info["users"] == N
        assert info["matches"] == dict(sorted(want.items()))
        assert info["ranges"]["done"] == info["ranges"]["total"] >= 4
        assert sum(v["users"] for v in info["workers"].values()) == N
        results = drain_results(c, info["enters"])
        assert len(results) == info["enters"] == sum(want.values()) and info["exits"] == 0
        assert Counter(r["rule"] for r in results) == want
        assert {r["run_id"] for r in results} == {run_id}

        # When the same day runs again, nothing changes
        again = c.runs.wait(start_run(c.shards, c.runs, c.bus, AS_OF, 300), timeout=60)
        assert again["users"] == N and again["enters"] == again["exits"] == 0
        assert again["matches"] == info["matches"]

        # And a redelivered job of a finished range is skipped
        job = c.runs.jobs(run_id)  # none left to do
        assert job == []
        c.bus.publish(c.bus.topic("jobs"), orjson.dumps(
            {"type": "range", "run_id": run_id, "range_no": 0, "shard": 0, "lo": 1,
             "hi": 2**63 - 1, "as_of": AS_OF.isoformat(), "rules": None}))
        c.bus.flush()
        later = c.runs.wait(start_run(c.shards, c.runs, c.bus, AS_OF, 300), timeout=60)
        assert later["status"] == "done"
        assert len(drain_results(c, len(results))) == len(results)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)


def test_a_restricted_run_speaks_only_for_its_rules(deployment: Container) -> None:
    c = deployment
    load_users(c, N)
    stop, threads = start_evaluators(c, 1)
    try:
        first = c.runs.wait(start_run(c.shards, c.runs, c.bus, AS_OF, 300), timeout=60)
        # A year later most rules changed their mind; the campaign evaluates one rule
        later = AS_OF + timedelta(days=400)
        camp = c.runs.wait(start_run(c.shards, c.runs, c.bus, later, 300, rules=["birthday"],
                                     kind="campaign"), timeout=60)
        assert camp["status"] == "done" and camp["users"] == N and camp["kind"] == "campaign"
        assert set(camp["matches"]) <= {"birthday"}
        results = drain_results(c, first["enters"] + camp["enters"] + camp["exits"])
        mine = [r for r in results if r["run_id"] == camp["id"]]
        assert mine and {r["rule"] for r in mine} == {"birthday"}
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)


def test_a_range_that_keeps_failing_is_parked(
    deployment: Container, request: pytest.FixtureRequest
) -> None:
    c = deployment
    load_users(c, N)
    run_id = start_run(c.shards, c.runs, c.bus, AS_OF, 300)
    # Given shard 1 is gone after planning (its database dropped / its file deleted)
    store = c.shards.stores[1]
    if c.kind == "embedded":  # type: ignore[attr-defined]
        store.close()
        Path(store.engine.url.database).unlink()
        Path(store.engine.url.database).mkdir()  # not even openable
    else:
        name = store.engine.url.database
        store.engine.dispose()
        dsn = store.engine.url.set(database="postgres").render_as_string(hide_password=False)
        with psycopg.connect(dsn.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    stop, threads = start_evaluators(c)
    try:
        # Then the run ends "done with errors", its shard-1 ranges parked with the cause
        info = c.runs.wait(run_id, timeout=60)
        assert info["status"] == "done_with_errors"
        parked = info["parked"]
        assert parked and {p["shard"] for p in parked} == {1}
        assert info["ranges"]["parked"] == len(parked)
        assert info["ranges"]["done"] + len(parked) == info["ranges"]["total"]
        assert all(p["attempts"] == 3 and p["error"] for p in parked)
        assert 0 < info["users"] < N  # shard 0's users
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)


def test_a_users_job_evaluates_just_those_users_as_of_today(deployment: Container) -> None:
    c = deployment
    docs = load_users(c, 300)
    chosen = sorted(docs)[:40]
    shard_of = c.shards.router.shard_of
    stop = threading.Event()
    threads = [c.evaluator_worker().start_thread(stop)]
    try:
        for shard in (0, 1):
            ids = [u for u in chosen if shard_of(u) == shard]
            c.bus.publish(c.bus.topic("jobs"), orjson.dumps({"type": "users", "shard": shard,
                                                             "user_ids": ids}))
        c.bus.flush()
        want = expected_matches(c, {u: docs[u] for u in chosen}, AS_OF)
        results = drain_results(c, sum(want.values()))
        assert Counter(r["rule"] for r in results) == want
        assert {r["user_id"] for r in results} <= set(chosen)
        assert all(r["run_id"] is None and r["as_of"] == AS_OF.isoformat() for r in results)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)


@contextlib.contextmanager
def pack_plus(
    tmp_path: Path, key: str, source: str, **settings: Any
) -> Iterator[tuple[Container, dict]]:
    """An embedded deployment with the built-in pack, one more rule and 200 users."""
    from rules.models import RuleIn

    c = Container(make_settings("embedded", None, tmp_path, range_target_users=300,  # type: ignore[arg-type]
                                **settings))
    c.migrate()
    try:
        install_pack(c.rules, BUILTIN_RULES)
        c.rules.create(RuleIn(key=key, name=key, source=source))
        yield c, load_users(c, 200)
    finally:
        c.close()


def run_once(c: Container, worker: Any = None) -> dict:
    """One run over every user by one evaluator (``worker``, or a new one); its figures."""
    stop = threading.Event()
    threads = [(worker or c.evaluator_worker()).start_thread(stop)]
    try:
        return c.runs.wait(start_run(c.shards, c.runs, c.bus, AS_OF, 300), timeout=60)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)


def cpu(rule: str) -> float:
    """CPU seconds charged to ``rule`` so far (kvadrupel_rule_cpu_seconds_total)."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("kvadrupel_rule_cpu_seconds_total", {"rule": rule}) or 0.0


def test_a_rule_that_overruns_its_budget_is_quarantined_only_if_it_does_again(
    tmp_path: Path,
) -> None:
    spin = "def match(profile, ctx):\n    while True:\n        pass\n"
    with pack_plus(tmp_path, "spin", spin, rule_budget_ms=30) as (c, _):
        worker = c.evaluator_worker()
        ctx = [AS_OF.isoformat(), c.settings.timezone]
        pack = worker.pack()
        row = encode_rows([(1, {"birth_date": "1990-11-24"}, None)])
        # A rule that is fine is not confirmed as overrunning (a CPU stall would be);
        # the confirmation runs in a sandbox child, as the evaluation does
        assert worker._confirm("confirm_timeout", pack, "birthday", row, ctx) is False
        assert worker._confirm("confirm_timeout", pack, "spin", row, ctx) is True

        info = run_once(c, worker)
        assert info["status"] == "done" and info["users"] == 200
        got = c.rules.get("spin")
        assert got["status"] == "quarantined" and "ms budget" in got["quarantine"]["reason"]
        assert c.rules.get("birthday")["status"] == "active"


def test_a_rule_slow_on_every_profile_is_quarantined_by_the_batch_budget(tmp_path: Path) -> None:
    # Given the pack plus a rule that takes a few ms of CPU per profile (never near
    # its 50 ms per-profile budget), and a batch budget of 100 ms per rule
    crawl = ("def match(profile, ctx):\n    n = 0\n    for i in range(40000):\n"
             "        n = n + i\n    return n > 0\n")
    with pack_plus(tmp_path, "crawl", crawl, rule_batch_budget_ms=100) as (c, docs):
        want = expected_matches(c, docs, AS_OF)
        cpu0 = {k: cpu(k) for k in ("crawl", "birthday")}

        # When a run evaluates everyone
        info = run_once(c)

        # Then the slow rule is quarantined for the batch budget, naming a user
        got = c.rules.get("crawl")
        assert got["status"] == "quarantined", got
        assert "batch budget" in got["quarantine"]["reason"]
        assert int(got["quarantine"]["user_id"]) in docs
        # and the run finished for every user, with every other rule's matches intact
        assert info["status"] == "done" and info["users"] == 200
        assert info["matches"].get("crawl", 0) < 200
        assert {k: v for k, v in info["matches"].items() if k != "crawl"} == \
            {k: v for k, v in sorted(want.items()) if k != "crawl"}
        assert c.rules.get("birthday")["status"] == "active"
        # and what each rule cost is exported and kept with the run: the slow one dominates
        assert cpu("crawl") - cpu0["crawl"] >= 0.05 > cpu("birthday") - cpu0["birthday"]
        assert next(iter(info["rule_cpu"])) == "crawl"
        assert info["rule_cpu"]["crawl"]["seconds"] >= 0.05
        assert info["rule_cpu"]["crawl"]["us_per_user"] >= 0.05 / 200 * 1e6
