"""Goals through the REST API: bad goal code is refused at save with a 4xx naming
the problem; a good goal's reads join the rule's; the experiment report of a rule
nobody was exposed to yet says so."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from kvadrupel.container import Container
from tests.api.test_rest import RULE, H
from tests.api.test_rest import api as api  # noqa: F401 - the fixture

Api = tuple[TestClient, Container]
GOAL = "\ndef goal(profile, ctx):\n    return has(profile, 'driver_license.renewed_on')\n"


@pytest.mark.parametrize(("extra", "reason"), [
    ("\ndef goal(profile):\n    return True\n", "`goal` must take exactly two arguments"),
    ("\nGOAL_WINDOW_DAYS = 400" + GOAL, "from 1 to 365"),
    ("\nGOAL_WINDOW_DAYS = 7\n", "defines no `def goal"),
    ("\ndef goal(profile, ctx):\n    return profile.__dict__\n", "__dict__"),
])
def test_bad_goal_code_is_refused_with_a_reason(api: Api, extra: str, reason: str) -> None:
    client, c = api
    r = client.post("/v1/rules", json=RULE | {"source": RULE["source"] + extra},
                    headers=H["admin"])
    assert 400 <= r.status_code < 500, r.text
    assert reason in r.text
    assert client.get("/v1/rules/dl-soon", headers=H["admin"]).status_code == 404


def test_a_goal_is_saved_and_reported(api: Api) -> None:
    client, _ = api
    r = client.post("/v1/rules", json=RULE | {"source": RULE["source"]
                                               + "GOAL_WINDOW_DAYS = 45\n" + GOAL,
                                               "holdout": 10.0},
                    headers=H["admin"])
    assert r.status_code == 201, r.text
    assert r.json()["reads"] == ["driver_license.expires_on", "driver_license.renewed_on"]
    assert client.get("/v1/rules/dl-soon/experiment").status_code == 401
    rep = client.get("/v1/rules/dl-soon/experiment", headers=H["admin"]).json()
    assert rep["goal"] == {"window_days": 45} and rep["analysis"] is None
    assert [(a["arm"], a["exposed"], a["converted"]) for a in rep["by_arm"]] == [
        ("treatment", 0, 0), ("holdout", 0, 0), ("control", 0, 0)]
    assert rep["verdict"].startswith("No comparison yet")
