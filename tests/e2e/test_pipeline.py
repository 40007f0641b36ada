"""Events in → sharded profiles → sandboxed rules → banners and e-mails out."""

from __future__ import annotations

from datetime import timedelta

from tests.e2e.conftest import AS_OF, Pipeline
from tests.fixtures.waiting import scaled, wait_for

USER = 4_200_000_017


def banner_rules(p: Pipeline, uid: int = USER) -> list[str]:
    r = p.client.get(f"/v1/users/{uid}/banners", headers=p.auth("portal"))
    assert r.status_code == 200, r.text
    return [b["rule"] for b in r.json()["banners"]]


def post(p: Pipeline, *events: dict) -> None:
    r = p.client.post("/v1/events", json=list(events), headers=p.auth("ingest"))
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": len(events)}


def run_nightly(p: Pipeline) -> dict:
    r = p.client.post("/v1/runs", json={"as_of": AS_OF.isoformat()}, headers=p.auth("admin"))
    assert r.status_code == 202, r.text
    run = p.container.runs.wait(r.json()["id"], timeout=scaled(30))
    assert run["status"] == "done", run
    got = p.client.get(f"/v1/runs/{run['id']}", headers=p.auth("admin")).json()
    assert got["status"] == "done"
    return got


def test_licence_expiring_then_renewed(pipeline: Pipeline) -> None:
    p = pipeline
    # Given a citizen whose licence expires in 20 days
    post(p, {"event_id": "e1", "user_id": USER,
             "set": {"email": "citizen@example.org", "birth_date": "1980-03-03",
                     "driver_license": {"expires_on": (AS_OF + timedelta(days=20)).isoformat()}}})

    # Then the dl-expiring banner is served within 2 s and exactly one e-mail arrives
    wait_for(lambda: banner_rules(p), "the dl-expiring banner (banners served)",
             until=lambda rules: "dl-expiring" in rules, timeout=2.0, every=0.02)
    wait_for(lambda: [(m["To"], m["Subject"]) for m in p.mails()], "the e-mail (to, subject)",
             until=lambda mails: len(mails) >= 1, timeout=5.0, every=0.02)
    mails = p.mails()
    assert len(mails) == 1
    assert mails[0]["To"] == "citizen@example.org"

    # When the nightly job runs twice
    first = run_nightly(p)
    second = run_nightly(p)
    p.settle()

    # Then the user was evaluated and matched, and still exactly one e-mail exists
    assert first["users"] == second["users"] == 1
    assert first["matches"].get("dl-expiring") == 1
    assert len(p.mails()) == 1
    assert banner_rules(p) == ["dl-expiring"]

    # When the licence is renewed
    post(p, {"event_id": "e2", "user_id": USER,
             "set": {"driver_license": {"expires_on": (AS_OF + timedelta(days=3650)).isoformat(),
                                        "renewed_on": AS_OF.isoformat()}}})

    # Then dl-expiring is gone and dl-renewed appears
    wait_for(lambda: banner_rules(p), "dl-renewed only (banners served)",
             until=lambda rules: rules == ["dl-renewed"], timeout=2.0, every=0.02)


def test_dismissed_banner_stays_hidden(pipeline: Pipeline) -> None:
    p = pipeline
    post(p, {"event_id": "d1", "user_id": USER + 1,
             "set": {"driver_license": {"expires_on": (AS_OF - timedelta(days=3)).isoformat()}}})
    wait_for(lambda: banner_rules(p, USER + 1), "dl-expired only (banners served)",
             until=lambda rules: rules == ["dl-expired"], timeout=2.0, every=0.02)
    banner_id = p.client.get(f"/v1/users/{USER + 1}/banners", headers=p.auth("portal")).json()[
        "banners"
    ][0]["id"]

    r = p.client.post(f"/v1/users/{USER + 1}/banners/{banner_id}/dismiss", headers=p.auth("portal"))
    assert r.status_code == 204
    assert banner_rules(p, USER + 1) == []

    run_nightly(p)
    p.settle()
    assert banner_rules(p, USER + 1) == []
