"""Preview, forecast, shadow and diff against an oracle computed in plain Python."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from catalogue.audience import wilson
from kvadrupel.container import Container
from kvadrupel.settings import Settings
from kvadrupel.synthetic import users
from rules.models import RuleIn

AS_OF = date(2026, 11, 24)
N = 3000
ADMIN = {"Authorization": "Bearer " + "a" * 24}
BIRTHDAY = RuleIn(key="bday", name="Birthday", source="def match(profile, ctx):\n"
                  "    return is_birthday(get(profile, 'birth_date'), ctx)\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Container, dict[int, dict]]]:
    settings = Settings(data_dir=Path(tmp_path_factory.mktemp("aud")), admin_token="a" * 24)
    c = Container(settings)
    c.migrate()
    docs = dict(users(N, AS_OF, seed=3))
    for shard, uids in c.shards.router.split(docs).items():
        c.shards.stores[shard].put_profiles([(u, docs[u]) for u in uids])
    c.rules.create(BIRTHDAY)
    yield c, docs
    c.close()


def born_on(doc: dict, day: date) -> bool:
    b = date.fromisoformat(doc["birth_date"])
    return (b.month, b.day) == (day.month, day.day)


def test_preview_over_everyone_is_exact(world: tuple[Container, dict[int, dict]]) -> None:
    c, docs = world
    got = c.rules.preview("bday", AS_OF, "all")
    truth = sorted(u for u, d in docs.items() if born_on(d, AS_OF))
    assert got["evaluated"] == N and got["matches"] == len(truth)
    assert got["audience"] == {
        "estimate": len(truth),
        "low": len(truth),
        "high": len(truth),
        "exact": True,
    }
    assert set(got["examples"]) <= set(truth) and len(got["examples"]) == min(20, len(truth))


def test_sampled_preview_estimates_with_an_interval(
    world: tuple[Container, dict[int, dict]],
) -> None:
    c, docs = world
    rule = RuleIn(
        key="has-car",
        name="Has a car",
        source="def match(profile, ctx):\n    return has(profile, 'vehicle')\n",
    )
    c.rules.create(rule)
    truth = sum("vehicle" in d for d in docs.values())
    got = c.rules.preview("has-car", AS_OF, 1000)
    n, est = got["evaluated"], got["audience"]["estimate"]
    assert 500 < n < 1600 and not got["audience"]["exact"]
    p = truth / N
    se = math.sqrt(p * (1 - p) / n) * N
    assert abs(est - truth) < 6 * se
    assert got["audience"]["low"] <= est <= got["audience"]["high"]


def test_forecast_counts_new_matches_per_day(world: tuple[Container, dict[int, dict]]) -> None:
    c, docs = world
    got = c.rules.forecast("bday", AS_OF, 10, "all")
    for i, day in enumerate(got["days"]):
        d = AS_OF + timedelta(days=i)
        assert day["date"] == d.isoformat()
        assert day["estimate"] == sum(born_on(doc, d) for doc in docs.values())


def test_shadow_counts_gain_and_loss(world: tuple[Container, dict[int, dict]]) -> None:
    c, docs = world
    candidate = ("def match(profile, ctx):\n    b = date(get(profile, 'birth_date'))\n"
                 "    return b is not None and month(b) == month(ctx.today)\n")
    got = c.rules.shadow("bday", AS_OF, "all", source=candidate)
    in_month = {
        u for u, d in docs.items() if date.fromisoformat(d["birth_date"]).month == AS_OF.month
    }
    today = {u for u, d in docs.items() if born_on(d, AS_OF)}
    assert got["gain"]["estimate"] == len(in_month - today)
    assert got["lose"]["estimate"] == len(today - in_month) == 0


def test_wilson_interval_contains_the_proportion() -> None:
    lo, hi = wilson(30, 100)
    assert lo < 0.3 < hi and hi - lo < 0.2
    assert wilson(0, 0) == (0.0, 1.0)


def test_rest_preview_forecast_diff(world: tuple[Container, dict[int, dict]]) -> None:
    c, _ = world
    client = TestClient(create_app(c))
    r = client.post(
        "/v1/rules/bday/preview", json={"as_of": AS_OF.isoformat(), "sample": "all"}, headers=ADMIN
    )
    assert r.status_code == 200 and r.json()["evaluated"] == N
    r = client.post(
        "/v1/rules/bday/forecast",
        json={"from": AS_OF.isoformat(), "days": 3, "sample": 500},
        headers=ADMIN,
    )
    assert r.status_code == 200 and len(r.json()["days"]) == 3
    assert client.post("/v1/rules/bday/preview", json={"as_of": "2026-01-01", "sample": 0},
                       headers=ADMIN).status_code == 422
    r = client.post(
        "/v1/rules/bday/shadow",
        json={"as_of": AS_OF.isoformat(), "source": "import os"},
        headers=ADMIN,
    )
    assert r.status_code == 422 and r.json()["errors"][0]["line"] == 1

    changed = BIRTHDAY.model_dump() | {"name": "Happy birthday", "priority": 5}
    assert client.put("/v1/rules/bday", json=changed, headers=ADMIN).status_code == 200
    d = client.get("/v1/rules/bday/diff?from=1&to=2", headers=ADMIN).json()
    assert d["fields"]["name"] == {"from": "Birthday", "to": "Happy birthday"}
    assert d["fields"]["priority"] == {"from": 100, "to": 5} and d["source"] == ""
