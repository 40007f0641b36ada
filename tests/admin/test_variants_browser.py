"""The rule form edits every content field and the content variants, in a real browser
(Playwright driving Debian's Chromium, headless): an analyst fills the banner's expiry,
category, importance and translations, its push (texts, translations, category,
importance), the e-mail's options and translations and two variants; the saved version
carries all of it, the form shows it again, a change of a variant's weight makes a new
version, and a bad variant is refused with its reason."""

from __future__ import annotations

import json

from playwright.sync_api import Browser, expect

from tests.admin.conftest import LiveServer
from tests.admin.test_browser import Session
from tests.admin.test_browser import browser as browser  # noqa: F401 - the fixture

SOURCE = "def match(profile, ctx):\n    return get(profile, 'probe.on') == True\n"
KEY = "content-everywhere"


def test_the_form_saves_every_content_field_and_the_variants(
        browser: Browser, live_server: LiveServer) -> None:  # noqa: F811
    ana = Session(browser, live_server.url)
    page = ana.page
    ana.login("ana")
    page.get_by_test_id("new-rule").click()
    page.get_by_test_id("rule-key").fill(KEY)
    page.get_by_test_id("rule-name").fill("Every content field")
    page.wait_for_function("window.kvEditor !== undefined")
    page.evaluate("src => window.kvEditor.setValue(src)", SOURCE)
    expect(page.get_by_test_id("validation-ok")).to_be_visible()

    page.get_by_test_id("banner-title").fill("Hello {{ profile.name }}")
    page.locator("input[name=banner_link]").fill("/renew")
    page.get_by_test_id("banner-expires-at").fill("2026-12-31")
    page.get_by_test_id("banner-category").fill("licences")
    page.get_by_test_id("banner-importance").select_option("critical")
    page.get_by_test_id("banner-translations").fill(json.dumps({"de": {"title": "Hallo"}}))
    page.get_by_test_id("push-on").check()
    page.get_by_test_id("push-title").fill("Push {{ profile.name }}")
    page.get_by_test_id("push-category").fill("pushes")
    page.get_by_test_id("push-importance").select_option("critical")
    page.get_by_test_id("push-translations").fill(json.dumps({"de": {"title": "Schub"}}))
    page.get_by_test_id("email-subject").fill("Subject")
    page.locator("textarea[name=email_text]").fill("Text {{ profile.name }}")
    page.get_by_test_id("email-category").fill("mails")
    page.get_by_test_id("email-translations").fill(json.dumps({"de": {"subject": "Betreff"}}))
    page.get_by_test_id("add-variant").click()
    page.get_by_test_id("add-variant").click()
    rows = page.get_by_test_id("variant")
    expect(rows).to_have_count(2)
    for i, (key, weight) in enumerate((("a", "70"), ("b", "30"))):
        row = rows.nth(i)
        row.locator("input[name=var_key]").fill(key)
        row.locator("input[name=var_weight]").fill(weight)
    rows.nth(0).locator("textarea[name=var_banner]").fill(json.dumps(
        {"title": "A {{ profile.name }}", "translations": {"de": {"title": "A de"}}}))
    rows.nth(1).locator("textarea[name=var_email]").fill(json.dumps(
        {"subject": "B subject", "text": "B text", "importance": "critical"}))
    page.get_by_test_id("save").click()
    expect(page.locator(".flash.ok, .flash.warn").first).to_contain_text("version 1")

    saved = live_server.container.rules.get(KEY)
    assert saved["banner"] == {
        "title": "Hello {{ profile.name }}", "body": "", "link": "/renew",
        "expires_at": "2026-12-31", "category": "licences", "importance": "critical",
        "translations": {"de": {"title": "Hallo", "body": None, "link": None}},
        "push": {"title": "Push {{ profile.name }}", "body": None, "link": None,
                 "category": "pushes", "importance": "critical",
                 "translations": {"de": {"title": "Schub", "body": None, "link": None}}}}
    assert saved["email"] == {
        "subject": "Subject", "text": "Text {{ profile.name }}", "html": None,
        "category": "mails",
        "translations": {"de": {"subject": "Betreff", "text": None, "html": None}}}
    assert [(v["key"], v["weight"]) for v in saved["variants"]] == [("a", 70.0), ("b", 30.0)]
    assert saved["variants"][0]["banner"]["translations"]["de"]["title"] == "A de"
    assert "email" not in saved["variants"][0]
    assert saved["variants"][1]["email"]["importance"] == "critical"

    # The form shows it all again; a weight changed in the browser is a new version.
    page.reload()
    expect(page.get_by_test_id("banner-importance")).to_have_value("critical")
    expect(page.get_by_test_id("push-on")).to_be_checked()
    assert json.loads(page.get_by_test_id("push-translations").input_value()) == {
        "de": {"title": "Schub", "body": None, "link": None}}
    rows = page.get_by_test_id("variant")
    expect(rows).to_have_count(2)
    expect(rows.nth(1).locator("input[name=var_key]")).to_have_value("b")
    rows.nth(1).locator("input[name=var_weight]").fill("50")
    page.get_by_test_id("save").click()
    expect(page.locator(".flash").first).to_contain_text("version 2")
    saved = live_server.container.rules.get(KEY)
    assert [(v["key"], v["weight"]) for v in saved["variants"]] == [("a", 70.0), ("b", 50.0)]
    assert saved["banner"]["push"]["category"] == "pushes"  # untouched fields stay

    # Removing the push in the form removes it; a bad variant is refused with its reason.
    page.get_by_test_id("push-on").uncheck()
    rows = page.get_by_test_id("variant")
    rows.nth(0).locator("input[name=var_weight]").fill("0")
    page.get_by_test_id("save").click()
    expect(page.locator("#validation li").first).to_contain_text("greater than 0")
    assert live_server.container.rules.get(KEY)["version"] == 2
    rows = page.get_by_test_id("variant")
    rows.nth(0).locator("input[name=var_weight]").fill("70")
    rows.nth(1).get_by_role("button", name="remove variant").click()
    page.get_by_test_id("save").click()
    expect(page.locator("#validation li").first).to_contain_text("2 to 10")
    page.get_by_test_id("variant").first.get_by_role("button", name="remove variant").click()
    page.get_by_test_id("save").click()
    expect(page.locator(".flash").first).to_contain_text("version 3")
    saved = live_server.container.rules.get(KEY)
    assert saved["variants"] is None and "push" not in saved["banner"]
    ana.close(expected_failures=("422 POST /admin/rules/content-everywhere",) * 2)
