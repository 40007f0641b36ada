"""tests/fixtures/waiting.py: the one wait helper and its timeout scale."""

from __future__ import annotations

import time

import pytest

from tests.fixtures.smtp import SmtpServer
from tests.fixtures.waiting import SCALE_ENV, scale, scaled, wait_for


@pytest.fixture(autouse=True)
def _unscaled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SCALE_ENV, raising=False)


def test_returns_the_first_value_that_satisfies_until() -> None:
    seen = iter(range(100))
    assert wait_for(lambda: next(seen), "a 3", until=lambda n: n >= 3, every=0) == 3
    assert wait_for(lambda: "ok", "anything truthy") == "ok"


def test_the_timeout_message_says_what_it_waited_for_and_what_it_saw_last() -> None:
    counter = iter(range(10_000))
    with pytest.raises(AssertionError) as e:
        wait_for(lambda: {"n": next(counter)}, "the counter to reach a million",
                 until=lambda v: v["n"] >= 1_000_000, timeout=0.05, every=0.01)
    msg = str(e.value)
    assert msg.startswith("timed out after 0.05s (timeout scale x1) waiting for "
                          "the counter to reach a million; last saw: {'n': ")
    last = int(msg.rsplit(": ", 1)[1].rstrip("}"))
    assert last >= 1 and last == next(counter) - 1  # the very last value probed


def test_a_long_last_value_is_cut_short() -> None:
    with pytest.raises(AssertionError) as e:
        wait_for(lambda: "x" * 10_000, "nothing", until=lambda v: False, timeout=0.01)
    assert len(str(e.value)) < 700 and "... (10002 chars)" in str(e.value)


def test_the_scale_multiplies_every_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SCALE_ENV, "3")
    assert scale() == 3.0 and scaled(60) == 180.0
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match=r"after 0\.15s \(timeout scale x3\) waiting for"):
        wait_for(lambda: False, "never", timeout=0.05, every=0.01)
    assert time.monotonic() - t0 >= 0.15


@pytest.mark.parametrize("raw", ["fast", "0", "-1", "inf", "nan"])
def test_a_bad_scale_is_refused(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(SCALE_ENV, raw)
    with pytest.raises(ValueError, match=SCALE_ENV):
        scaled(1)


def test_an_exception_of_the_last_attempt_is_reported_and_chained() -> None:
    calls = iter(range(10_000))

    def probe() -> int:
        n = next(calls)
        if n >= 2:
            raise ConnectionRefusedError("not listening")
        return n

    with pytest.raises(AssertionError) as e:
        wait_for(probe, "the server", until=lambda n: n > 5, timeout=0.05, every=0.01)
    assert ("last saw: 1; the last probe raised ConnectionRefusedError: not listening"
            in str(e.value))
    assert isinstance(e.value.__cause__, ConnectionRefusedError)
    with pytest.raises(AssertionError, match=r"last saw: nothing \(no probe returned\); the last"):
        wait_for(lambda: {}["k"], "a key", timeout=0.01)


def test_an_assertion_in_the_probe_fails_at_once_and_retry_on_narrows_what_is_retried() -> None:
    def dead() -> bool:
        raise AssertionError("the process exited")

    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="the process exited"):
        wait_for(dead, "the process", timeout=5)
    with pytest.raises(KeyError):
        wait_for(lambda: {}["k"], "a key", timeout=5, retry_on=())
    assert time.monotonic() - t0 < 1


def test_the_smtp_server_wait_says_what_arrived(monkeypatch: pytest.MonkeyPatch,
                                                smtp_server: SmtpServer) -> None:
    monkeypatch.setenv(SCALE_ENV, "2")
    with pytest.raises(AssertionError) as e:
        smtp_server.wait_for(1, timeout=0.05)
    smtp_server.wait_for(0, timeout=0.05)  # nothing to wait for
    msg = str(e.value)
    assert msg.startswith("timed out after 0.1s (timeout scale x2) waiting for 1 e-mails at smtp://")
    assert msg.endswith("(recipients, subject of each); last saw: []")
