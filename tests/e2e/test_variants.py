"""Content variants end to end: a rule with two weighted variants (and a 30 % holdout)
over a few hundred users, through the ingest path, on both setups (production:
PostgreSQL shards, the Kafka-protocol broker, a real SMTP server).

Each treated user gets the e-mail and banner of the variant the documented hash gives
them (channels/variants.py), and the variant is recorded in the banner row and JSON,
the ledger row, "why" and the engagement counts; held-out users get nothing, and their
ghost episode records the variant they would have got."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from base.buckets import bucket, in_share, pick_weighted
from shards.schema import banners, episodes
from tests.e2e.conftest import Pipeline
from tests.fixtures.waiting import wait_for

BASE = 4_500_000_000
USERS = list(range(BASE + 1, BASE + 241))
KEY, HOLDOUT = "va-two", 30.0
WEIGHTS = {"a": 70.0, "b": 30.0}


def rule() -> dict[str, Any]:
    return {
        "key": KEY, "name": KEY, "holdout": HOLDOUT,
        "source": "def match(profile, ctx):\n    return get(profile, 'probe.on') == True\n",
        "banner": {"title": "base for {{ profile.name }}", "body": "b", "link": "/x"},
        "email": {"subject": "base subject", "text": "Hello {{ profile.name }}"},
        "variants": [
            {"key": "a", "weight": WEIGHTS["a"],
             "banner": {"title": "A for {{ profile.name }}", "body": "ba", "link": "/a"},
             "email": {"subject": "A subject", "text": "A hello {{ profile.name }}",
                       "translations": {"de": {"subject": "A Betreff"}}}},
            {"key": "b", "weight": WEIGHTS["b"],
             "banner": {"title": "B for {{ profile.name }}", "body": "bb", "link": "/b"},
             "email": {"subject": "B subject", "text": "B hello {{ profile.name }}"}},
        ],
    }


def expected() -> tuple[dict[int, str], set[int]]:
    """Each user's variant by the documented hash, and the held-out users."""
    keys = list(WEIGHTS)
    variant = {u: keys[pick_weighted(bucket(f"{KEY}/variant", u), list(WEIGHTS.values()))]
               for u in USERS}
    held = {u for u in USERS if in_share(bucket(KEY, u), HOLDOUT)}
    return variant, held


def lang(u: int) -> str:
    return "de" if u % 5 == 0 else "en"


def test_users_get_their_variant_and_it_is_recorded(pipeline: Pipeline) -> None:
    p = pipeline
    admin = p.auth("admin")
    r = p.client.post("/v1/rules", json=rule(), headers=admin)
    assert r.status_code == 201, r.text
    assert [v["key"] for v in r.json()["variants"]] == ["a", "b"]
    variant, held = expected()
    treated = sorted(set(USERS) - held)
    assert {variant[u] for u in treated} == {"a", "b"} and held

    events = [{"event_id": f"va-{u}", "user_id": u,
               "set": {"email": f"u{u}@example.org", "name": f"N{u}", "language": lang(u),
                       "probe": {"on": True}}} for u in USERS]
    assert p.client.post("/v1/events", json=events,
                         headers=p.auth("ingest")).status_code == 202

    def got_episodes() -> dict[int, tuple[str | None, str | None]]:
        out = {}
        for store in p.container.shards.stores:
            with store.engine.connect() as conn:
                for row in conn.execute(select(episodes.c.user_id, episodes.c.arm,
                                               episodes.c.variant)
                                        .where(episodes.c.rule_key == KEY)):
                    out[int(row.user_id)] = (row.arm, row.variant)
        return out

    def mails() -> dict[int, Any]:
        return {int(str(m["To"]).split("@")[0][1:]): m for m in p.mails()
                if str(m["X-Kvadrupel-Rule"]).startswith(f"{KEY}/")}

    wait_for(got_episodes, "an episode for every user",
             until=lambda got: len(got) == len(USERS), timeout=30.0, every=0.1)
    wait_for(mails, "the treated users' e-mails",
             until=lambda got: len(got) >= len(treated), timeout=30.0, every=0.1)
    p.settle()

    # Episodes, ghosts included, record the variant by the hash.
    assert got_episodes() == {
        u: ("holdout" if u in held else "treatment", variant[u]) for u in USERS}
    # Every treated user got their variant's e-mail (its translation too), nobody else.
    sent = mails()
    assert sorted(sent) == treated
    for u in treated:
        v = variant[u].upper()
        want = f"{v} Betreff" if (v == "A" and lang(u) == "de") else f"{v} subject"
        assert str(sent[u]["Subject"]) == want, u
        body = sent[u].get_body(("plain",)).get_content()
        assert f"{v} hello N{u}" in body
    # Banners: the stored row and the API's JSON carry the variant and its content.
    for store in p.container.shards.stores:
        with store.engine.connect() as conn:
            for row in conn.execute(select(banners.c.user_id, banners.c.variant,
                                           banners.c.title).where(banners.c.rule_key == KEY)):
                u = int(row.user_id)
                assert u not in held
                assert (row.variant, row.title) == (variant[u], f"{variant[u].upper()} for N{u}")
    shown = {}
    for u in USERS:
        r = p.client.get(f"/v1/users/{u}/banners", headers=p.auth("portal"))
        assert r.status_code == 200, r.text
        for b in r.json()["banners"]:
            if b["rule"] == KEY:
                shown[u] = (b["variant"], b["title"], b["link"])
    assert shown == {u: (variant[u], f"{variant[u].upper()} for N{u}", f"/{variant[u]}")
                     for u in treated}
    # The ledger row and "why".
    u = treated[0]
    r = p.client.get(f"/v1/users/{u}/banners/{KEY}.1/why", headers=admin)
    assert r.status_code == 200, r.text
    why = r.json()
    assert (why["variant"], why["banner"]["variant"]) == (variant[u], variant[u])
    assert [(m["channel"], m["variant"]) for m in why["messages"]] == [("email", variant[u])]
    ghost = sorted(held)[0]
    r = p.client.get(f"/v1/users/{ghost}/banners/{KEY}.1/why", headers=admin)
    assert (r.json()["arm"], r.json()["variant"], r.json()["banner"]) == (
        "holdout", variant[ghost], None)
    # Engagement per variant: the portal echoes the banner's variant.
    counts = {"a": [0, 0], "b": [0, 0]}
    for u in treated[:40]:
        v = variant[u]
        base = f"/v1/users/{u}/banners/{KEY}.1"
        assert p.client.post(f"{base}/impression", params={"variant": v},
                             headers=p.auth("portal")).status_code == 204
        counts[v][0] += 1
        if u % 2:
            assert p.client.post(f"{base}/click", params={"variant": v},
                                 headers=p.auth("portal")).status_code == 204
            counts[v][1] += 1
    r = p.client.post(f"/v1/users/{u}/banners/{KEY}.1/click", params={"variant": "Bad!"},
                      headers=p.auth("portal"))
    assert r.status_code == 422
    r = p.client.get(f"/v1/rules/{KEY}/engagement", headers=admin)
    assert r.status_code == 200, r.text
    got = {k: [v["impressions"], v["clicks"]] for k, v in r.json()["variants"].items()}
    assert got == {k: c for k, c in counts.items() if c[0]}
    assert sum(d["impressions"] for d in r.json()["days"]) == 40
