"""Goals end to end on both setups (production: PostgreSQL shards, the Kafka-protocol
broker, a real SMTP server): a rule holding out 50 % with a 10 % global control group
and a goal. Profiles arrive through the ingest API, episodes start (ghost ones for
held-out users, who get no e-mail), later events make the goal true for some users —
a path only the goal reads — and the experiment endpoint reports the conversions per
arm; a further event does not count anyone twice."""

from __future__ import annotations

from typing import Any

from tests.e2e.conftest import Pipeline
from tests.e2e.test_holdouts import CONTROL, USERS, arms, mails_of
from tests.fixtures.waiting import wait_for

KEY = "goal-half"
HOLDOUT = 50.0
SOURCE = '''GOAL_WINDOW_DAYS = 30

def match(profile, ctx):
    return get(profile, "probe.on") == True

def goal(profile, ctx):
    return get(profile, "probe.done") == True
'''


def counts(p: Pipeline) -> dict[str, tuple[int, int]]:
    r = p.client.get(f"/v1/rules/{KEY}/experiment", headers=p.auth("admin"))
    assert r.status_code == 200, r.text
    return {a["arm"]: (a["exposed"], a["converted"]) for a in r.json()["by_arm"]}


def test_conversions_are_counted_per_arm_and_reported(pipeline: Pipeline) -> None:
    p = pipeline
    admin = p.auth("admin")
    assert p.client.put("/v1/control-group", json={"percent": CONTROL},
                        headers=admin).status_code == 200
    rule: dict[str, Any] = {
        "key": KEY, "name": KEY, "holdout": HOLDOUT, "source": SOURCE,
        "banner": {"title": "Finish it", "body": "b", "link": "/x"},
        "email": {"subject": "Finish it", "text": "Hello {{ profile.name }}"}}
    r = p.client.post("/v1/rules", json=rule, headers=admin)
    assert r.status_code == 201, r.text
    assert r.json()["reads"] == ["probe.done", "probe.on"]
    expected = arms(KEY, HOLDOUT)
    treated = sorted(u for u, a in expected.items() if a == "treatment")

    def send(tag: str, users: list[int], probe: dict[str, Any]) -> None:
        events = [{"event_id": f"{tag}-{u}", "user_id": u,
                   "set": {"email": f"u{u}@example.org", "name": f"N{u}", "probe": probe}}
                  for u in users]
        r = p.client.post("/v1/events", json=events, headers=p.auth("ingest"))
        assert r.status_code == 202, r.text

    send("on", USERS, {"on": True})
    exposed = {a: sum(1 for x in expected.values() if x == a)
               for a in ("treatment", "holdout", "control")}
    wait_for(lambda: counts(p), "every user exposed in their arm",
             until=lambda c: {a: n for a, (n, _) in c.items()} == exposed, timeout=30.0,
             every=0.2)
    wait_for(lambda: mails_of(p, KEY), "the treated users' e-mails",
             until=lambda got: len(got) >= len(treated), timeout=30.0, every=0.1)
    p.settle()
    assert mails_of(p, KEY) == treated  # nothing to the held out
    assert all(c == 0 for _, c in counts(p).values())

    # Every third user reaches the goal (through ingest: the path only the goal reads)
    done = USERS[::3]
    send("done", done, {"on": True, "done": True})
    want = {a: (exposed[a], sum(1 for u in done if expected[u] == a)) for a in exposed}
    assert all(want[a][1] for a in want)  # every arm has some
    wait_for(lambda: counts(p), "the conversions per arm", until=lambda c: c == want,
             timeout=30.0, every=0.2)

    # A further change of those users: still one conversion per episode
    send("again", done, {"on": True, "done": True, "n": 2})
    p.settle()
    assert counts(p) == want
    rep = p.client.get(f"/v1/rules/{KEY}/experiment", headers=admin).json()
    assert rep["analysis"]["srm"]["flagged"] is False
    untreated = next(a for a in rep["analysis"]["arms"] if a["control"])
    assert (untreated["exposed"], untreated["converted"]) == (
        want["holdout"][0] + want["control"][0], want["holdout"][1] + want["control"][1])
    assert rep["verdict"]
