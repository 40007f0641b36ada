"""Holdouts in the admin UI: an approver sets the global control group (audited, range
checked); a save from the rule editor keeps the rule's holdout and salt."""

from __future__ import annotations

from api.admin.store import AuditLog
from channels.holdouts import get_control_share
from rules.models import RuleIn
from tests.admin.conftest import AdminEnv
from tests.admin.test_security import SOURCE, flashes, rule_form


def test_an_approver_sets_the_global_control_group(admin_env: AdminEnv) -> None:
    control = admin_env.container.control
    ana = admin_env.as_user("ana")
    page = ana.client.get("/admin/approvals").text
    assert 'data-testid="control-group"' in page and "control-group-form" not in page
    assert ana.post("/admin/control-group", {"percent": "5"}).status_code == 403
    assert get_control_share(control) == 0.0

    pat = admin_env.as_user("pat")
    assert "control-group-form" in pat.client.get("/admin/approvals").text
    r = pat.post("/admin/control-group", {"percent": "7,5"})
    assert any("7.5 %" in f for f in flashes(r.text)), flashes(r.text)
    assert get_control_share(control) == 7.5
    entry = AuditLog(control, admin_env.container.clock).list(target="control-group")[0]
    assert (entry["actor"], entry["action"], entry["detail"]) == (
        "pat", "settings.control_group", {"from": 0.0, "to": 7.5})

    for bad in ("16", "-1", "lots", ""):
        r = pat.post("/admin/control-group", {"percent": bad})
        assert any(f.startswith("Not changed") for f in flashes(r.text)), (bad, flashes(r.text))
    assert get_control_share(control) == 7.5


def test_an_editor_save_keeps_the_holdout_and_salt(admin_env: AdminEnv) -> None:
    svc = admin_env.container.rules
    ana = admin_env.as_user("ana")
    ana.post("/admin/rules", rule_form())
    current = svc.get("vr-soon")
    data = {k: current[k] for k in RuleIn.model_fields if k in current}
    svc.update("vr-soon", RuleIn.model_validate(data | {"holdout": 20.0, "salt": "vr/2"}),
               author="api")
    assert svc.get("vr-soon")["version"] == 2
    ana.post("/admin/rules/vr-soon", rule_form())  # nothing changed in the form
    assert svc.get("vr-soon")["version"] == 2
    ana.post("/admin/rules/vr-soon", rule_form(source=SOURCE.replace("<= 14", "<= 30")))
    saved = svc.get("vr-soon")
    assert (saved["version"], saved["holdout"], saved["salt"]) == (3, 20.0, "vr/2")
