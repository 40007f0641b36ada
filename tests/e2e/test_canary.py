"""Canary rollout end to end, on both setups (production: PostgreSQL shards, the
Kafka-protocol broker, a real SMTP server): a new version at 30 % changes exactly the
users of the 30 % bucket range whose answer differs, through incremental runs and
the ingest path; a rollback puts them back; promotion changes exactly the users the
shadow diff predicted; a verifying run then finds nothing stale."""

from __future__ import annotations

from typing import Any

from base.buckets import bucket, in_share, rollout_salt
from scheduler.planner import start_run
from tests.e2e.conftest import AS_OF, Pipeline
from tests.fixtures.waiting import scaled, wait_for

BASE = 4_500_000_000
USERS = list(range(BASE + 1, BASE + 241))
KEY, PCT = "cn-renew", 30
V1 = "3 <= get(profile, 'probe.x', 0) <= 5"  # version 1 matches x in 3..5
V2 = "4 <= get(profile, 'probe.x', 0) <= 6"  # version 2: gains x = 6, loses x = 3


def rule(cond: str, tag: str, enabled: bool = True) -> dict[str, Any]:
    return {
        "key": KEY, "name": KEY, "enabled": enabled,
        "source": f"def match(profile, ctx):\n    return {cond}\n",
        "banner": {"title": f"{tag} for {{{{ profile.name }}}}", "body": "b", "link": "/x"},
        "email": {"subject": f"{tag} subject", "text": "Hello {{ profile.name }}"},
    }


def x_of(u: int) -> int:
    return u % 8


def in_canary(u: int) -> bool:
    return in_share(bucket(rollout_salt(KEY), u), PCT)


def banners(p: Pipeline) -> dict[int, str]:
    """user -> the title of the rule's banner, for the users who have one."""
    out = {}
    for u in USERS:
        r = p.client.get(f"/v1/users/{u}/banners", headers=p.auth("portal"))
        assert r.status_code == 200, r.text
        for b in r.json()["banners"]:
            if b["rule"] == KEY:
                out[u] = b["title"].split(" ")[0]
    return out


def mails(p: Pipeline, tag: str) -> set[int]:
    return {int(str(m["To"]).split("@")[0][1:]) for m in p.mails()
            if str(m["Subject"]).startswith(f"{tag} ")}


def run(p: Pipeline, *, full: bool = False) -> dict[str, Any]:
    c = p.container
    run_id = start_run(c.shards, c.runs, c.bus, AS_OF, active=c.rules.active_versions(),
                       full=full)
    got = c.runs.wait(run_id, timeout=scaled(90))
    assert got["status"] == "done", got
    p.settle()
    return got


def settled_banners(p: Pipeline, expected: set[int]) -> dict[int, str]:
    return wait_for(lambda: banners(p), f"banners of {len(expected)} users",
                    until=lambda got: set(got) == expected, timeout=30.0, every=0.2)


def test_canary_rollout_and_promotion_change_exactly_the_expected_users(
        pipeline: Pipeline) -> None:
    p = pipeline
    admin = p.auth("admin")
    svc = p.container.rules
    assert p.client.post("/v1/rules", json=rule(V1, "v1"), headers=admin).status_code == 201
    events = [{"event_id": f"cn-{u}", "user_id": u,
               "set": {"email": f"u{u}@example.org", "name": f"N{u}", "probe": {"x": x_of(u)}}}
              for u in USERS]
    assert p.client.post("/v1/events", json=events, headers=p.auth("ingest")).status_code == 202
    v1_users = {u for u in USERS if 3 <= x_of(u) <= 5}
    settled_banners(p, v1_users)
    run(p)  # a complete run: the incremental nights start from here

    # the shadow diff of the candidate predicts promotion; saved without going live
    shadow = svc.shadow(KEY, AS_OF, "all", source=rule(V2, "v2")["source"], examples=10_000)
    r = p.client.put(f"/v1/rules/{KEY}", json=rule(V2, "v2", enabled=False), headers=admin)
    assert r.status_code == 200 and r.json()["version"] == 2, r.text
    gain, lose = set(shadow["gained_examples"]), set(shadow["lost_examples"])
    assert gain == {u for u in USERS if x_of(u) == 6} and lose == {u for u in USERS
                                                                   if x_of(u) == 3}
    assert shadow["gain"]["estimate"] == len(gain) and shadow["lose"]["estimate"] == len(lose)

    # canary at 30 %: exactly the users in the bucket range whose answer differs move
    r = p.client.post(f"/v1/rules/{KEY}/rollout", json={"percent": PCT, "from_version": 1},
                      headers=admin)
    assert r.status_code == 200, r.text
    assert (r.json()["version"], r.json()["rollout"], r.json()["rollout_from"]) == (2, PCT, 1)
    canary = {u for u in USERS if in_canary(u)}
    assert 40 < len(canary) < 105
    got = run(p)
    assert got["mode"] in ("due", "verify") and got["sweep"] == [KEY], got
    after = (v1_users - (lose & canary)) | (gain & canary)
    titles = settled_banners(p, after)
    assert {u for u, t in titles.items() if t == "v2"} == gain & canary
    wait_for(lambda: mails(p, "v2"), "the canary's e-mails",
             until=lambda m: m == gain & canary, timeout=30.0, every=0.2)
    # the shadow diff during the canary still compares with what everyone had
    assert set(svc.shadow(KEY, AS_OF, "all", version=2, examples=10_000)
               ["gained_examples"]) == gain

    # the ingest path picks the version per user too: users moved to x = 6
    movers = [u for u in USERS if x_of(u) == 0][:24]
    events = [{"event_id": f"cn-m-{u}", "user_id": u, "set": {"probe": {"x": 6}}}
              for u in movers]
    assert p.client.post("/v1/events", json=events, headers=p.auth("ingest")).status_code == 202
    entered = {u for u in movers if in_canary(u)}
    assert entered and entered != set(movers)
    after |= entered
    gain |= set(movers)  # promotion will add them too (they match v2 only)
    titles = settled_banners(p, after)
    assert all(titles[u] == "v2" for u in entered)

    # roll back: the canary's users go back to version 1
    r = p.client.post(f"/v1/rules/{KEY}/rollback", headers=admin)
    assert r.status_code == 200 and r.json()["version"] == 1 and r.json()["rollout"] is None
    run(p)
    settled_banners(p, v1_users)
    # and forward again: the same 30 % ...
    r = p.client.post(f"/v1/rules/{KEY}/rollout", json={"percent": PCT, "from_version": 1},
                      headers=admin)
    assert r.status_code == 409, r.text  # v1 is current now: there is no v1 -> v1 canary
    r = p.client.put(f"/v1/rules/{KEY}", json=rule(V2, "v2", enabled=False), headers=admin)
    assert r.json()["version"] == 3, r.text  # the next free number after a rollback
    r = p.client.post(f"/v1/rules/{KEY}/rollout", json={"percent": PCT, "from_version": 1},
                      headers=admin)
    assert r.status_code == 200, r.text
    run(p)
    settled_banners(p, (v1_users - (lose & canary)) | (gain & canary))

    # ... then promotion: everyone on the new version; changed = the shadow diff
    shadow = svc.shadow(KEY, AS_OF, "all", version=3, examples=10_000)
    assert (set(shadow["gained_examples"]), set(shadow["lost_examples"])) == (gain, lose)
    r = p.client.post(f"/v1/rules/{KEY}/promote", headers=admin)
    assert r.status_code == 200 and r.json()["rollout"] is None and r.json()["version"] == 3
    run(p)
    final = settled_banners(p, (v1_users - lose) | gain)
    assert set(final) ^ v1_users == gain | lose  # exactly the users the diff named
    check = run(p, full=True)
    assert check["mode"] == "verify" and check["mismatches"] == 0, check

    actions = [r["action"] for r in _audit(p)]
    assert actions == ["rollout.set", "rollout.rollback", "rollout.set", "rollout.promote"]


def _audit(p: Pipeline) -> list[dict[str, Any]]:
    from api.admin.store import AuditLog

    rows = AuditLog(p.container.control).list(target=f"rule:{KEY}")
    return list(reversed(rows))
