"""Canary rollout on the launch page: an approver starts a canary, changes its share,
rolls it back and promotes it, in a real browser (Playwright + Chromium); an analyst
cannot, nor can the approver who wrote the version; every action is audited."""

from __future__ import annotations

from playwright.sync_api import Browser, expect

from api.admin.store import AuditLog
from rules.models import RuleIn
from tests.admin.conftest import AdminEnv, LiveServer
from tests.admin.test_browser import Session
from tests.admin.test_browser import browser as browser  # noqa: F401 - the fixture
from tests.admin.test_security import flashes

KEY = "cn-admin"
SOURCE = "def match(profile, ctx):\n    return get(profile, 'probe.x', 0) >= {n}\n"


def _two_versions(svc, author: str = "api") -> None:  # noqa: ANN001
    rule = {"key": KEY, "name": KEY, "source": SOURCE.format(n=5),
            "banner": {"title": "t", "body": "b", "link": "/x"}}
    svc.create(RuleIn.model_validate(rule), author=author)
    svc.update(KEY, RuleIn.model_validate(rule | {"source": SOURCE.format(n=3),
                                                  "enabled": False}), author=author)


def test_only_an_approver_who_did_not_write_it_rolls_out(admin_env: AdminEnv) -> None:
    svc = admin_env.container.rules
    _two_versions(svc, author="quinn")
    ana = admin_env.as_user("ana")
    assert 'data-testid="canary-form"' not in ana.client.get(f"/admin/rules/{KEY}/launch").text
    assert ana.post(f"/admin/rules/{KEY}/rollout", {"percent": "10"}).status_code == 403
    quinn = admin_env.as_user("quinn")
    assert quinn.post(f"/admin/rules/{KEY}/rollout", {"percent": "10"}).status_code == 403
    pat = admin_env.as_user("pat")
    for bad in ("0", "150", ""):
        r = pat.post(f"/admin/rules/{KEY}/rollout", {"percent": bad})
        assert any("1 to 100" in f for f in flashes(r.text)), (bad, flashes(r.text))
    r = pat.post(f"/admin/rules/{KEY}/rollout", {"percent": "ten"})
    assert r.status_code == 422 and "whole number" in r.text
    assert svc.get(KEY)["rollout"] is None
    r = pat.post(f"/admin/rules/{KEY}/promote")
    assert any("not in a canary" in f for f in flashes(r.text)), flashes(r.text)
    r = pat.post(f"/admin/rules/{KEY}/rollout", {"percent": "10", "from_version": "1"})
    assert any("10 % of the users" in f for f in flashes(r.text)), flashes(r.text)
    # changing the share of a running canary is the approver's too, whoever wrote it
    r = quinn.post(f"/admin/rules/{KEY}/rollout", {"percent": "20"})
    assert svc.get(KEY)["rollout"] == 20


def test_canary_buttons_in_the_browser(browser: Browser, live_server: LiveServer) -> None:
    svc = live_server.container.rules
    _two_versions(svc)
    pat = Session(browser, live_server.url)
    page = pat.page
    pat.login("pat")
    pat.goto(f"/admin/rules/{KEY}/launch")
    form = page.get_by_test_id("canary-form")
    expect(form.locator("select[name=from_version]")).to_have_value("1")
    form.get_by_test_id("canary-percent").fill("25")
    form.get_by_test_id("canary-start").click()
    expect(page.get_by_test_id("canary-status")).to_contain_text("25 %")
    expect(page.get_by_test_id("canary-status")).to_contain_text("stay on v1")
    assert (svc.get(KEY)["rollout"], svc.get(KEY)["rollout_from"]) == (25, 1)
    pat.shot("canary-running")

    page.get_by_test_id("canary-percent").fill("50")
    page.get_by_test_id("canary-set").click()
    expect(page.get_by_test_id("canary-status")).to_contain_text("50 %")
    page.get_by_test_id("canary-rollback").click()
    expect(page.get_by_test_id("canary-form")).to_be_visible()
    assert (svc.get(KEY)["version"], svc.get(KEY)["rollout"]) == (1, None)

    # v1 is current after the rollback: save the new version again (v3), roll it out
    # from v1, then promote it.
    svc.update(KEY, RuleIn.model_validate({
        "key": KEY, "name": KEY, "source": SOURCE.format(n=3), "enabled": False,
        "banner": {"title": "t", "body": "b", "link": "/x"}}), author="api")
    pat.goto(f"/admin/rules/{KEY}/launch")
    form = page.get_by_test_id("canary-form")
    form.locator("select[name=from_version]").select_option("1")
    form.get_by_test_id("canary-percent").fill("10")
    form.get_by_test_id("canary-start").click()
    expect(page.get_by_test_id("canary-status")).to_contain_text("v3 for 10 %")
    page.get_by_test_id("canary-promote").click()
    expect(page.get_by_test_id("canary-form")).to_be_visible()
    assert (svc.get(KEY)["version"], svc.get(KEY)["rollout"]) == (3, None)

    log = AuditLog(live_server.container.control).list(target=f"rule:{KEY}")
    assert [(e["actor"], e["action"]) for e in reversed(log)] == [
        ("pat", "rollout.set"), ("pat", "rollout.set"), ("pat", "rollout.rollback"),
        ("pat", "rollout.set"), ("pat", "rollout.promote")]
    pat.close()
