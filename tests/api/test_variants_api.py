"""Content variants through the REST API: saved with the version, shown by GET and
/diff, refused with a 422 that names the problem, kept by a new built-in pack version."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from kvadrupel.container import Container
from kvadrupel.demo import install_pack
from rules.models import RuleIn
from tests.api.test_rest import RULE, H
from tests.api.test_rest import api as api  # noqa: F401 - the fixture

Api = tuple[TestClient, Container]
VARIANTS = [{"key": "a", "weight": 1, "banner": {"title": "A"}},
            {"key": "b", "weight": 3, "email": {"subject": "B", "text": "b"}}]


def test_variants_are_part_of_the_version(api: Api) -> None:
    client, _ = api
    r = client.post("/v1/rules", json=RULE | {"variants": VARIANTS}, headers=H["admin"])
    assert r.status_code == 201, r.text
    got = r.json()["variants"]
    assert [(v["key"], v["weight"]) for v in got] == [("a", 1.0), ("b", 3.0)]
    assert got[0]["banner"]["title"] == "A" and "email" not in got[0]
    body: dict[str, Any] = RULE | {"variants": [VARIANTS[0], VARIANTS[1] | {"weight": 1}]}
    body.pop("key")
    r = client.put("/v1/rules/dl-soon", json=body, headers=H["admin"])
    assert r.status_code == 200, r.text
    r = client.get("/v1/rules/dl-soon/diff", params={"from": 1, "to": 2}, headers=H["admin"])
    assert r.status_code == 200, r.text
    assert "variants" in r.json()["fields"]


def test_bad_variants_are_a_422_with_the_reason(api: Api) -> None:
    client, _ = api
    for bad, reason in (([VARIANTS[0]], "2 to 10"), ([VARIANTS[0], VARIANTS[0]], "unique"),
                        ([VARIANTS[0], VARIANTS[1] | {"weight": 0}], "greater than 0"),
                        ([VARIANTS[0], {"key": "c", "weight": 1, "push": {}}], "push")):
        r = client.post("/v1/rules", json=RULE | {"variants": bad}, headers=H["admin"])
        assert r.status_code == 422, r.text
        assert reason in r.text, (reason, r.text)


def test_a_new_pack_version_keeps_the_variants_of_a_built_in_rule(api: Api) -> None:
    _, c = api
    install_pack(c.rules, [RULE])
    cur = c.rules.get("dl-soon")
    data = {k: cur[k] for k in RuleIn.model_fields if k in cur}
    c.rules.update("dl-soon", RuleIn.model_validate(data | {"variants": VARIANTS}))
    install_pack(c.rules, [RULE | {"source": str(RULE["source"]) + "\n"}])
    got = c.rules.get("dl-soon")
    assert got["version"] == 3 and [v["key"] for v in got["variants"]] == ["a", "b"]
