"""Holdouts in the REST API: a rule's holdout share and salt (create, update, get, diff)
and the global control group, with out-of-range values refused."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from base.buckets import CONTROL_SALT
from channels.holdouts import arm_of, get_control_share
from kvadrupel.container import Container
from kvadrupel.demo import install_pack
from rules.models import RuleIn
from tests.api.test_rest import RULE, H
from tests.api.test_rest import api as api  # noqa: F401 - the fixture

Api = tuple[TestClient, Container]


def _put(client: TestClient, **fields: Any) -> Any:
    body = {k: v for k, v in RULE.items() if k != "key"} | fields
    return client.put("/v1/rules/dl-soon", json=body, headers=H["admin"])


def test_a_rules_holdout_and_salt_are_saved_per_version(api: Api) -> None:
    client, c = api
    r = client.post("/v1/rules", json=RULE, headers=H["admin"])
    assert r.status_code == 201, r.text
    assert (r.json()["holdout"], r.json()["salt"]) == (0.0, None)  # defaults: nobody, the key

    r = _put(client, holdout=12.5)
    assert r.status_code == 200, r.text
    assert (r.json()["version"], r.json()["holdout"], r.json()["salt"]) == (2, 12.5, None)
    r = _put(client, holdout=12.5, salt="dl-soon/2026-12")
    assert (r.json()["version"], r.json()["holdout"], r.json()["salt"]) == (
        3, 12.5, "dl-soon/2026-12")
    got = client.get("/v1/rules/dl-soon", headers=H["admin"]).json()
    assert (got["holdout"], got["salt"]) == (12.5, "dl-soon/2026-12")
    versions = client.get("/v1/rules/dl-soon/versions", headers=H["admin"]).json()["versions"]
    assert [(v["holdout"], v["salt"]) for v in versions] == [
        (0.0, None), (12.5, None), (12.5, "dl-soon/2026-12")]
    diff = client.get("/v1/rules/dl-soon/diff?from=1&to=3", headers=H["admin"]).json()
    assert diff["fields"]["holdout"] == {"from": 0.0, "to": 12.5}
    assert diff["fields"]["salt"] == {"from": None, "to": "dl-soon/2026-12"}
    # the delivery side reads the same version's figures
    users = range(4_200_000_000, 4_200_000_400)
    assert set(c.arms.arms([(u, "dl-soon", 1) for u in users])) == {"treatment"}
    assert c.arms.arms([(u, "dl-soon", 3) for u in users]) == [
        arm_of(u, "dl-soon/2026-12", 12.5, 0.0) for u in users]
    assert "holdout" in c.arms.arms([(u, "dl-soon", 2) for u in users])


@pytest.mark.parametrize("fields", [
    {"holdout": 50.5}, {"holdout": -1}, {"holdout": "half"}, {"salt": ""},
    {"salt": "with space"}, {"salt": "x" * 201},
])
def test_bad_holdouts_are_refused_and_nothing_is_saved(api: Api, fields: dict[str, Any]) -> None:
    client, _ = api
    r = client.post("/v1/rules", json=RULE | fields, headers=H["admin"])
    assert r.status_code == 422, r.text
    assert next(iter(fields)) in r.text
    assert client.get("/v1/rules", headers=H["admin"]).json()["rules"] == []
    assert client.post("/v1/rules", json=RULE, headers=H["admin"]).status_code == 201
    r = _put(client, **fields)
    assert r.status_code == 422, r.text
    assert client.get("/v1/rules/dl-soon", headers=H["admin"]).json()["version"] == 1


def test_the_global_control_group(api: Api) -> None:
    client, c = api
    assert client.get("/v1/control-group").status_code == 401
    assert client.get("/v1/control-group", headers=H["portal"]).status_code == 401
    r = client.get("/v1/control-group", headers=H["admin"])
    assert r.json() == {"percent": 0.0, "max": 15.0, "salt": CONTROL_SALT}
    r = client.put("/v1/control-group", json={"percent": 7.5}, headers=H["admin"])
    assert r.status_code == 200 and r.json()["percent"] == 7.5
    assert client.get("/v1/control-group", headers=H["admin"]).json()["percent"] == 7.5
    assert get_control_share(c.control) == 7.5
    for bad in ({"percent": 15.01}, {"percent": -1}, {"percent": "lots"}, {}, {"percent": 5,
                                                                                "x": 1}):
        r = client.put("/v1/control-group", json=bad, headers=H["admin"])
        assert r.status_code == 422, (bad, r.text)
    assert get_control_share(c.control) == 7.5


def test_a_new_pack_version_keeps_the_holdout_of_a_built_in_rule(api: Api) -> None:
    _, c = api
    install_pack(c.rules, [RULE])
    cur = c.rules.get("dl-soon")
    data = {k: cur[k] for k in RuleIn.model_fields if k in cur}
    c.rules.update("dl-soon", RuleIn.model_validate(data | {"holdout": 5.0, "salt": "s2"}))
    install_pack(c.rules, [RULE | {"source": str(RULE["source"]) + "\n"}])
    got = c.rules.get("dl-soon")
    assert (got["version"], got["holdout"], got["salt"]) == (3, 5.0, "s2")
