"""Runs and campaigns through the REST API and the CLI (embedded deployment)."""

from __future__ import annotations

import argparse
import io
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from kvadrupel import runs_cli
from kvadrupel.container import Container
from kvadrupel.demo import install_pack
from rules.pack import BUILTIN_RULES
from tests.scheduler.helpers import AS_OF, AS_OF_MIDNIGHT, TOKENS, load_users, make_settings

ADMIN = {"Authorization": f"Bearer {TOKENS['admin_token']}"}


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Container]:
    c = Container(make_settings("embedded", None, tmp_path,  # type: ignore[arg-type]
                                range_target_users=200, clock_start=AS_OF_MIDNIGHT,
                                timezone="Europe/Moscow"))  # the zone naive times are read in
    c.migrate()
    install_pack(c.rules, BUILTIN_RULES)
    load_users(c, 800)
    stop = threading.Event()
    threads = c.start_workers(stop, ("evaluate",))
    yield c
    stop.set()
    for t in threads:
        t.join(timeout=10)
    c.close()


def test_runs_and_campaigns_over_rest(deployment: Container) -> None:
    c = deployment
    with TestClient(create_app(c)) as client:
        # A run restricted to unknown rules is refused
        r = client.post("/v1/runs", json={"rules": ["nope"]}, headers=ADMIN)
        assert r.status_code == 422 and "nope" in r.json()["detail"]
        assert client.post("/v1/runs", json={}).status_code == 401
        # A run of one rule, now
        r = client.post("/v1/runs", json={"rules": ["birthday"]}, headers=ADMIN)
        assert r.status_code == 202, r.text
        run = c.runs.wait(r.json()["id"], timeout=30)
        got = client.get(f"/v1/runs/{run['id']}", headers=ADMIN).json()
        assert got["status"] == "done" and got["rules"] == ["birthday"] and got["users"] == 800
        assert got["as_of"] == AS_OF.isoformat() and got["ranges"]["done"] == got["ranges"]["total"]
        assert set(got) >= {"users_per_s", "eta_s", "matches", "errors", "workers", "parked"}
        assert [x["id"] for x in client.get("/v1/runs", headers=ADMIN).json()["runs"]] == [
            run["id"]
        ]

        # A campaign: scheduled, listed, read, cancelled once
        at = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
        r = client.post(
            "/v1/campaigns",
            json={"rules": ["dl-expiring", "birthday"], "at": at.isoformat(), "name": "winter"},
            headers=ADMIN,
        )
        assert r.status_code == 201, r.text
        camp = r.json()
        assert camp["status"] == "scheduled" and camp["rules"] == ["dl-expiring", "birthday"]
        assert datetime.fromisoformat(camp["at"]) == at
        naive = client.post(
            "/v1/campaigns", json={"at": "2030-01-01T10:00:00"}, headers=ADMIN
        ).json()
        assert naive["at"] == "2030-01-01T07:00:00+00:00"  # read in Europe/Moscow
        assert naive["rules"] is None
        assert client.post("/v1/campaigns", json={"rules": ["nope"], "at": at.isoformat()},
                           headers=ADMIN).status_code == 422
        listed = client.get("/v1/campaigns?status=scheduled", headers=ADMIN).json()["campaigns"]
        assert {x["id"] for x in listed} == {camp["id"], naive["id"]}
        assert client.get(f"/v1/campaigns/{camp['id']}", headers=ADMIN).json()["name"] == "winter"
        r = client.delete(f"/v1/campaigns/{camp['id']}", headers=ADMIN)
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert client.delete(f"/v1/campaigns/{camp['id']}", headers=ADMIN).status_code == 409
        assert client.get("/v1/campaigns/999", headers=ADMIN).status_code == 404


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    runs_cli.add_parsers(p.add_subparsers(dest="cmd"))
    return p.parse_args(list(argv))


def test_cli_starts_a_run_and_follows_it(deployment: Container) -> None:
    c = deployment
    out = io.StringIO()  # not a terminal: progress lines instead of a redrawn bar
    assert runs_cli.dispatch(parse("run-nightly", "--as-of", "2026-11-24", "--wait"), c, out) == 0
    text = out.getvalue()
    assert "run 1 started as of 2026-11-24" in text
    assert "run 1 [" in text and "100.0%" in text and "users 800" in text
    assert "run 1 (manual, as of 2026-11-24): done" in text and "matches per rule:" in text

    out = io.StringIO()
    assert runs_cli.dispatch(parse("run", "status", "1", "--follow"), c, out) == 0
    assert "ranges   5 done, 0 running, 0 parked of 5" in out.getvalue()
    out = io.StringIO()
    runs_cli.dispatch(parse("run", "list"), c, out)
    assert "done" in out.getvalue() and "800 users" in out.getvalue()

    out = io.StringIO()
    runs_cli.dispatch(
        parse("campaign", "add", "--at", "2030-01-01 10:00", "--rules", "birthday"), c, out
    )
    assert '"status": "scheduled"' in out.getvalue()
    out = io.StringIO()
    runs_cli.dispatch(parse("campaign", "cancel", "1"), c, out)
    assert '"status": "cancelled"' in out.getvalue()


def test_progress_bar_rendering() -> None:
    info = {"id": 7, "status": "running", "users": 250_000, "users_est": 1_000_000,
            "ranges": {"total": 40, "done": 9, "running": 2, "parked": 1},
            "users_per_s": 50_000.0, "eta_s": 15.0}
    line = runs_cli.render_progress(info, width=20)
    assert line.startswith("run 7 [█████░░░░░░░░░░░░░░░]  25.0%")
    assert "ranges 9/40, 2 running, 1 parked" in line and "50,000/s" in line and "ETA 15s" in line
