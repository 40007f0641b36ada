"""RunService: ranges through claim/progress/done/fail/park, firing keys, figures."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from engine.runs import PlannedRange, RunService
from shards.migrations import runner
from shards.shardset import control_engine
from tests.scheduler.helpers import AS_OF


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def control(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'control.db'}"
    else:
        url = request.getfixturevalue("pg_factory")(0).control
    engine = control_engine(url)
    runner.upgrade("control", engine)
    yield engine
    engine.dispose()


RANGES = [
    PlannedRange(0, 1, 99, 50),
    PlannedRange(1, 1, 99, 40),
    PlannedRange(0, 100, 2**63 - 1, 10),
]


def test_a_run_finishes_with_its_last_range(control: Engine) -> None:
    runs = RunService(control)
    run_id, created = runs.create(AS_OF, RANGES, kind="nightly")
    assert created
    info = runs.get(run_id)
    assert info["status"] == "running" and info["users_est"] == 100 and info["kind"] == "nightly"
    assert [j.range_no for j in runs.jobs(run_id)] == [0, 1, 2]

    assert runs.claim(run_id, 0, "w1") == 1
    runs.progress(run_id, 0, "w1", 20)
    info = runs.get(run_id)
    assert info["ranges"]["running"] == 1 and info["users"] == 20 and info["eta_s"] is not None
    runs.range_done(run_id, 0, 50, {"a": 5}, {}, enters=5, exits=1, seconds=0.5, worker="w1")
    runs.range_done(
        run_id, 0, 50, {"a": 5}, {}, enters=5, exits=1, seconds=0.5, worker="w1"
    )  # redo
    assert runs.claim(run_id, 0, "w2") is None  # done: nothing to do
    for no in (1, 2):
        assert runs.claim(run_id, no, "w2") == 1
        runs.range_done(run_id, no, 25, {"a": 1, "b": 2}, {"b": 1}, seconds=0.25, worker="w2")
    info = runs.get(run_id)
    assert info["status"] == "done" and info["users"] == 100
    assert info["matches"] == {"a": 7, "b": 4} and info["errors"] == {"b": 2}
    assert info["enters"] == 5 and info["exits"] == 1
    assert info["workers"] == {
        "w1": {"ranges": 1, "users": 50, "seconds": 0.5, "users_per_s": 100.0},
        "w2": {"ranges": 2, "users": 50, "seconds": 0.5, "users_per_s": 100.0},
    }


def test_a_firing_key_makes_one_run(control: Engine) -> None:
    runs = RunService(control)
    first, created = runs.create(AS_OF, RANGES, fire_key="nightly@2026-11-24T02:00:00+03:00")
    again, created_again = runs.create(AS_OF, RANGES, fire_key="nightly@2026-11-24T02:00:00+03:00")
    assert created and not created_again and again == first
    assert len(runs.list()) == 1


def test_failing_range_is_retried_then_parked(control: Engine) -> None:
    runs = RunService(control, max_attempts=3)
    run_id, _ = runs.create(AS_OF, RANGES[:2])
    runs.claim(run_id, 1, "w")
    runs.range_done(run_id, 1, 40, {}, {})
    for attempt in (1, 2):
        assert runs.claim(run_id, 0, "w") == attempt
        assert runs.range_failed(run_id, 0, "ShardUnavailable: shard 0 down") is True
    assert runs.claim(run_id, 0, "w") == 3
    assert runs.range_failed(run_id, 0, "ShardUnavailable: shard 0 down") is False
    info = runs.get(run_id)
    assert info["status"] == "done_with_errors" and info["ranges"]["parked"] == 1
    assert info["parked"][0]["error"] == "ShardUnavailable: shard 0 down"


def test_a_range_whose_workers_keep_dying_is_parked_at_the_next_claim(control: Engine) -> None:
    runs = RunService(control, max_attempts=2)
    run_id, _ = runs.create(AS_OF, RANGES[:1])
    assert runs.claim(run_id, 0, "w1") == 1  # killed
    assert runs.claim(run_id, 0, "w2") == 2  # killed again
    assert runs.claim(run_id, 0, "w3") is None
    info = runs.get(run_id)
    assert info["status"] == "done_with_errors"
    assert "gave up after 2 attempts" in info["parked"][0]["error"]


def test_release_gives_the_attempt_back(control: Engine) -> None:
    runs = RunService(control, max_attempts=1)
    run_id, _ = runs.create(AS_OF, RANGES[:1])
    assert runs.claim(run_id, 0, "w") == 1
    runs.release(run_id, 0, "w")  # the bus was down: not the range's fault
    assert runs.claim(run_id, 0, "w") == 1


def test_concurrent_last_ranges_finish_the_run_once(control: Engine) -> None:
    runs = RunService(control)
    ranges = [PlannedRange(0, i * 10 + 1, i * 10 + 10, 10) for i in range(8)]
    run_id, _ = runs.create(AS_OF, ranges)
    for no in range(8):
        runs.claim(run_id, no, "w")
    errors: list[BaseException] = []

    def finish(no: int) -> None:
        try:
            runs.range_done(run_id, no, 10, {}, {})
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=finish, args=(no,)) for no in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    info = runs.get(run_id)
    assert info["status"] == "done" and info["users"] == 80


def test_unpublished_runs_are_found_for_republishing(control: Engine) -> None:
    runs = RunService(control)
    run_id, _ = runs.create(AS_OF, RANGES)
    assert runs.unpublished(-1) == [run_id]
    runs.mark_published(run_id)
    assert runs.unpublished(-1) == []


def test_incremental_planning_compares_with_the_last_complete_covering_run(
        control: Engine) -> None:
    from datetime import timedelta

    from scheduler.planner import scope

    runs = RunService(control)
    # Nothing run yet: the first night evaluates everyone
    assert scope(runs, AS_OF, {"a": 1}).mode == "full"
    runs.create(AS_OF, [], kind="nightly", mode="full", covers={"a": 1, "gone": 3})
    # A manual full run (no covers) and a campaign in between do not count
    runs.create(AS_OF, [], kind="manual")
    runs.create(AS_OF, [], kind="campaign", rules=["a"])
    # A run with a parked range does not either
    parked, _ = runs.create(AS_OF, [PlannedRange(0, 1, 9, 5)], mode="due", covers={"a": 2})
    for _ in range(3):
        runs.claim(parked, 0, "w")
        runs.range_failed(parked, 0, "boom")
    assert runs.get(parked)["status"] == "done_with_errors"
    assert runs.last_covers() == {"a": 1, "gone": 3}
    # So the next night sweeps the changed and the removed rules, and is due-only
    sc = scope(runs, AS_OF + timedelta(days=1), {"a": 2, "new": 1})
    assert (sc.mode, sc.sweep, sc.covers) == ("due", ["a", "gone", "new"], {"a": 2, "new": 1})
    # a week after the last full check it verifies; --full verifies at once
    assert scope(runs, AS_OF + timedelta(days=7), {"a": 1, "gone": 3}).mode == "verify"
    assert scope(runs, AS_OF, {"a": 1, "gone": 3}, full=True).mode == "verify"
    assert scope(runs, AS_OF, {"a": 1, "gone": 3}).sweep is None
    # a campaign (restricted) or a planner without the active rules evaluates everyone
    assert scope(runs, AS_OF, {"a": 1}, rules=["a"]).mode == "full"
    assert scope(runs, AS_OF, None).mode == "full"
