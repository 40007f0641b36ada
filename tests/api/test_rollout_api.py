"""Canary rollout through the REST API and the CLI: start, change the share, promote,
roll back; bad input refused with a reason; every action in the audit log; each change
makes the planner sweep the rule (its users re-evaluated)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.admin.store import AuditLog
from kvadrupel import cli
from kvadrupel.container import Container
from kvadrupel.settings import Settings
from rules.models import RuleIn
from tests.api.test_rest import RULE, H
from tests.api.test_rest import api as api  # noqa: F401 - the fixture

Api = tuple[TestClient, Container]


def _two_versions(client: TestClient) -> None:
    assert client.post("/v1/rules", json=RULE, headers=H["admin"]).status_code == 201
    body = {k: v for k, v in RULE.items() if k != "key"} | {"priority": 120}
    r = client.put("/v1/rules/dl-soon", json=body, headers=H["admin"])
    assert r.status_code == 200 and r.json()["version"] == 2, r.text


def _post(client: TestClient, path: str, body: Any = None, role: str = "admin") -> Any:
    return client.post(f"/v1/rules/dl-soon/{path}", json=body, headers=H.get(role, {}))


def test_rollout_promote_and_rollback(api: Api) -> None:
    client, c = api
    _two_versions(client)
    marks = [c.rules.active_versions()["dl-soon"]]
    assert marks == [2]
    r = _post(client, "rollout", {"percent": 10})  # from the version saved before: v1
    assert r.status_code == 200, r.text
    assert (r.json()["version"], r.json()["rollout"], r.json()["rollout_from"]) == (2, 10, 1)
    [rule] = [a for a in c.rules.active() if a.key == "dl-soon"]
    assert (rule.version, rule.rollout, rule.base and rule.base.version) == (2, 10, 1)
    marks.append(c.rules.active_versions()["dl-soon"])
    r = _post(client, "rollout", {"percent": 40})
    assert (r.json()["rollout"], r.json()["rollout_from"]) == (40, 1)
    marks.append(c.rules.active_versions()["dl-soon"])
    r = _post(client, "rollback")
    assert (r.json()["version"], r.json()["rollout"], r.json()["rollout_from"]) == (1, None, None)
    marks.append(c.rules.active_versions()["dl-soon"])
    r = _post(client, "rollout", {"percent": 25, "from_version": 1})
    assert r.status_code == 409, r.text  # v1 is current: nothing earlier to keep users on
    r = _post(client, "rollout", {"percent": 25, "from_version": 2})  # v1 canary from v2
    assert (r.json()["version"], r.json()["rollout"], r.json()["rollout_from"]) == (1, 25, 2)
    marks.append(c.rules.active_versions()["dl-soon"])
    r = _post(client, "rollout", {"percent": 100})  # 100 % of a canary: promotion
    assert (r.json()["version"], r.json()["rollout"]) == (1, None)
    marks.append(c.rules.active_versions()["dl-soon"])
    # every change of who gets which version changes what the planner compares
    assert all(a != b for a, b in zip(marks, marks[1:], strict=False))

    log = list(reversed(AuditLog(c.control).list(target="rule:dl-soon")))
    assert [(e["actor"], e["action"]) for e in log] == [
        ("api", "rollout.set"), ("api", "rollout.set"), ("api", "rollout.rollback"),
        ("api", "rollout.set"), ("api", "rollout.promote")]
    assert log[0]["detail"] == {"version": 2, "base": 1, "percent": 10, "previous": None}
    assert log[2]["detail"] == {"version": 1, "candidate": 2, "percent": 40}


@pytest.mark.parametrize("body", [{"percent": 0}, {"percent": 101}, {"percent": "half"},
                                  {"percent": 12.5}, {}, {"percent": 10, "extra": 1},
                                  {"percent": 10, "from_version": 0}])
def test_bad_rollouts_are_refused(api: Api, body: dict[str, Any]) -> None:
    client, c = api
    _two_versions(client)
    r = _post(client, "rollout", body)
    assert r.status_code == 422, r.text
    assert c.rules.get("dl-soon")["rollout"] is None


def test_refusals_say_why(api: Api) -> None:
    client, _ = api
    assert _post(client, "rollout", {"percent": 10}).status_code == 404
    assert client.post("/v1/rules", json=RULE, headers=H["admin"]).status_code == 201
    r = _post(client, "rollout", {"percent": 10})
    assert r.status_code == 409 and "no earlier version" in r.text
    assert client.post("/v1/rules/dl-soon/rollout", json={"percent": 10}).status_code == 401
    assert _post(client, "promote", role="portal").status_code == 401
    for action in ("promote", "rollback"):
        r = _post(client, action)
        assert r.status_code == 409 and "not in a canary" in r.text
    body = {k: v for k, v in RULE.items() if k != "key"}
    client.put("/v1/rules/dl-soon", json=body, headers=H["admin"])
    r = _post(client, "rollout", {"percent": 100})
    assert r.status_code == 409 and "enable" in r.text
    r = _post(client, "rollout", {"percent": 10, "from_version": 7})
    assert r.status_code == 404, r.text
    # failing examples block the canary as they block activation
    bad = body | {"examples": [{"name": "x", "profile": {}, "as_of": "2026-11-24",
                                "expect": True}], "enabled": False}
    assert client.put("/v1/rules/dl-soon", json=bad, headers=H["admin"]).status_code == 200
    r = _post(client, "rollout", {"percent": 10})
    assert r.status_code == 422 and "example" in r.text


def test_rule_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KVADRUPEL_DATA_DIR", str(tmp_path))
    c = Container(Settings(data_dir=tmp_path))
    c.migrate()
    c.rules.create(RuleIn.model_validate(RULE))
    c.rules.update("dl-soon", RuleIn.model_validate(RULE | {"priority": 5}))
    c.close()
    assert cli.main(["rule", "rollout", "dl-soon", "20"]) == 0
    assert "v2 for 20 % of the users, v1 for the rest" in capsys.readouterr().out
    assert cli.main(["rule", "rollout", "dl-soon", "0"]) == 1
    assert "1 to 100" in capsys.readouterr().err
    assert cli.main(["rule", "promote", "dl-soon"]) == 0
    assert "v2 for everyone" in capsys.readouterr().out
    assert cli.main(["rule", "rollback", "dl-soon"]) == 1
    assert "not in a canary" in capsys.readouterr().err
    assert cli.main(["rule", "promote", "nope"]) == 1
    c = Container(Settings(data_dir=tmp_path))
    log = AuditLog(c.control).list(target="rule:dl-soon")
    c.close()
    assert [(e["actor"], e["action"]) for e in reversed(log)] == [
        ("cli", "rollout.set"), ("cli", "rollout.promote")]
