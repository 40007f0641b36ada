"""Holdouts end to end: a rule holding out 50 % and a 10 % global control group over a
few hundred users, through the ingest path and a run (a campaign of one rule), on both
setups (production: PostgreSQL shards, the Kafka-protocol broker, a real SMTP server).

Held-out users get no e-mail and no banner but a ghost episode; treated users get
both; the global control group gets nothing from any rule."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from base.buckets import CONTROL_SALT, bucket, in_share
from shards.schema import episodes
from tests.e2e.conftest import AS_OF, Pipeline
from tests.fixtures.waiting import scaled, wait_for

BASE = 4_400_000_000
USERS = list(range(BASE + 1, BASE + 301))
CONTROL, HOLDOUT = 10.0, 50.0


def rule(key: str, holdout: float) -> dict[str, Any]:
    return {
        "key": key, "name": key, "holdout": holdout,
        "source": "def match(profile, ctx):\n    return get(profile, 'probe.on') == True\n",
        "banner": {"title": f"{key} for {{{{ profile.name }}}}", "body": "b", "link": "/x"},
        "email": {"subject": f"{key} subject", "text": "Hello {{ profile.name }}"},
    }


def arms(key: str, holdout: float) -> dict[int, str]:
    out = {}
    for u in USERS:
        if in_share(bucket(CONTROL_SALT, u), CONTROL):
            out[u] = "control"
        elif in_share(bucket(key, u), holdout):
            out[u] = "holdout"
        else:
            out[u] = "treatment"
    return out


def mails_of(p: Pipeline, key: str) -> list[int]:
    """The users an e-mail of rule ``key`` went to."""
    return sorted(int(str(m["To"]).split("@")[0][1:]) for m in p.mails()
                  if str(m["X-Kvadrupel-Rule"]).startswith(f"{key}/"))


def banner_users(p: Pipeline, key: str) -> list[int]:
    out = []
    for u in USERS:
        r = p.client.get(f"/v1/users/{u}/banners", headers=p.auth("portal"))
        assert r.status_code == 200, r.text
        if any(b["rule"] == key for b in r.json()["banners"]):
            out.append(u)
    return out


def episode_arms(p: Pipeline, key: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for store in p.container.shards.stores:
        with store.engine.connect() as conn:
            rows = conn.execute(select(episodes.c.user_id, episodes.c.arm, episodes.c.as_of,
                                       episodes.c.version)
                                .where(episodes.c.rule_key == key)).all()
        for r in rows:
            assert r.as_of == AS_OF and r.version == 1
            out[int(r.user_id)] = r.arm
    return out


def test_held_out_users_and_the_control_group_get_nothing(pipeline: Pipeline) -> None:
    p = pipeline
    admin = p.auth("admin")
    assert p.client.put("/v1/control-group", json={"percent": CONTROL},
                        headers=admin).status_code == 200
    r = p.client.post("/v1/rules", json=rule("ho-half", HOLDOUT), headers=admin)
    assert r.status_code == 201, r.text
    expected = arms("ho-half", HOLDOUT)
    treated = sorted(u for u, a in expected.items() if a == "treatment")
    assert 100 < len(treated) < 170 and "holdout" in expected.values()
    assert 10 < sum(a == "control" for a in expected.values()) < 60

    # The ingest path: profiles arrive, the rule is re-evaluated for each user.
    events = [{"event_id": f"ho-{u}", "user_id": u,
               "set": {"email": f"u{u}@example.org", "name": f"N{u}", "probe": {"on": True}}}
              for u in USERS]
    r = p.client.post("/v1/events", json=events, headers=p.auth("ingest"))
    assert r.status_code == 202, r.text
    wait_for(lambda: episode_arms(p, "ho-half"), "an episode for every user",
             until=lambda got: len(got) == len(USERS), timeout=30.0, every=0.1)
    wait_for(lambda: mails_of(p, "ho-half"), "the treated users' e-mails",
             until=lambda got: len(got) >= len(treated), timeout=30.0, every=0.1)
    p.settle()

    assert episode_arms(p, "ho-half") == expected  # ghost episodes: holdout, control
    assert mails_of(p, "ho-half") == treated
    assert banner_users(p, "ho-half") == treated

    # A run of a rule created later (a campaign of that rule): the global control group
    # gets nothing from it either, and the first rule sends nothing more.
    r = p.client.post("/v1/rules", json=rule("ho-none", 0.0), headers=admin)
    assert r.status_code == 201, r.text
    r = p.client.post("/v1/runs", json={"as_of": AS_OF.isoformat(), "rules": ["ho-none"]},
                      headers=admin)
    assert r.status_code == 202, r.text
    run = p.container.runs.wait(r.json()["id"], timeout=scaled(60))
    assert run["status"] == "done", run
    everyone_else = sorted(u for u in USERS if expected[u] != "control")
    wait_for(lambda: mails_of(p, "ho-none"), "the second rule's e-mails",
             until=lambda got: len(got) >= len(everyone_else), timeout=30.0, every=0.1)
    p.settle()
    assert mails_of(p, "ho-none") == everyone_else
    assert banner_users(p, "ho-none") == everyone_else
    assert episode_arms(p, "ho-none") == {
        u: "control" if a == "control" else "treatment" for u, a in expected.items()}
    assert mails_of(p, "ho-half") == treated

    # "why" names the arm of a ghost episode
    ghost = next(u for u, a in expected.items() if a == "holdout")
    r = p.client.get(f"/v1/users/{ghost}/banners/ho-half.1/why", headers=admin)
    assert r.status_code == 200, r.text
    assert (r.json()["arm"], r.json()["banner"], r.json()["messages"]) == ("holdout", None, [])
