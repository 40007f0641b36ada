"""The sandbox's child processes (rules/isolation.py) against real failures.

Every failure a hostile rule can cause in a child — a native crash, the memory
limit, CPU that no interrupt reaches, silence, a garbled answer — must end in a
:class:`SandboxCrash` with the reason in words, a counted death and a fresh child
for the next request, while the asking process goes on.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from base.errors import SandboxCrash
from rules.isolation import Limits, SandboxError, SandboxPool

MODULE = "tests.rules.crashing_child"


@pytest.fixture
def pool() -> Iterator[SandboxPool]:
    p = SandboxPool(MODULE, Limits(memory_mb=256, cpu_s=2.0, wall_s=3.0), size=1)
    try:
        yield p
    finally:
        p.close()


def deaths(label: str) -> float:
    return REGISTRY.get_sample_value("kvadrupel_sandbox_deaths_total", {"reason": label}) or 0.0


def test_a_warm_child_serves_requests_and_keeps_its_cache(pool: SandboxPool) -> None:
    a, body = pool.call("echo", body=b"x" * 100_000)
    b, _ = pool.call("echo")
    assert body == b"x" * 100_000 and a["pid"] == b["pid"]
    out, _ = pool.call("env", cache=("pack:1", lambda: {"rules": []}))
    assert out["cache"] == ["pack:1"]
    sent = []
    pool.call("env", cache=("pack:1", lambda: sent.append(1) or {}))
    assert sent == []  # the child has it: not sent again


def test_a_native_crash_is_a_sandbox_crash_and_the_next_request_gets_a_new_child(
        pool: SandboxPool) -> None:
    before = deaths("SIGSEGV")
    pid = pool.call("echo")[0]["pid"]
    with pytest.raises(SandboxCrash, match="SIGSEGV"):
        pool.call("segv")
    assert deaths("SIGSEGV") == before + 1 and pool.deaths == 1
    assert pool.call("echo")[0]["pid"] != pid


def test_the_memory_limit_stops_a_hoarding_child(pool: SandboxPool) -> None:
    assert pool.call("alloc", {"mb": 16})[0]["held"] == 16
    with pytest.raises(SandboxCrash, match="out of memory"):
        pool.call("alloc", {"mb": 1024})
    assert pool.call("alloc", {"mb": 16})[0]["held"] == 16


def test_cpu_spent_where_no_interrupt_reaches_is_killed_at_the_cpu_limit(
        pool: SandboxPool) -> None:
    t0 = time.monotonic()
    with pytest.raises(SandboxCrash, match="CPU limit|did not answer"):
        pool.call("spin", cpu_s=1.0)
    assert time.monotonic() - t0 < 20


def test_a_silent_child_is_killed_after_its_wall_time(pool: SandboxPool) -> None:
    with pytest.raises(SandboxCrash, match="did not answer"):
        pool.call("sleep", {"s": 60}, cpu_s=1.0)
    assert pool.call("echo")[0]["pid"]


def test_a_garbled_answer_is_a_crash_not_a_parse_in_the_parent(pool: SandboxPool) -> None:
    with pytest.raises(SandboxCrash):
        pool.call("garbage")
    assert pool.call("echo")[0]["pid"]


def test_an_error_inside_a_live_child_is_reported_and_the_child_lives(pool: SandboxPool) -> None:
    pid = pool.call("echo")[0]["pid"]
    with pytest.raises(SandboxError, match="bad input"):
        pool.call("fail")
    assert pool.call("echo")[0]["pid"] == pid


def test_children_inherit_no_secret_and_no_open_file(pool: SandboxPool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVADRUPEL_ADMIN_TOKEN", "secret-token")
    monkeypatch.setenv("KVADRUPEL_SHARDS", "postgresql://u:pw@db/x")
    leaked = open(os.devnull)  # noqa: SIM115 - an open file of the parent's
    try:
        out, _ = pool.call("env")
    finally:
        leaked.close()
    assert not [k for k in out["env"] if k.startswith("KVADRUPEL_")]
    # stdin, stdout, stderr, the protocol's copy of stdout, and what the
    # interpreter itself opened to list the folder: nothing of the parent's
    assert len(out["fds"]) <= 5, out["fds"]
