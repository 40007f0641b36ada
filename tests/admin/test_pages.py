"""The admin pages and fragments over the service layer (no browser): the list,
live validation, preview, forecast, version diff, shadow, runs, users, guide."""

from __future__ import annotations

import re

from api.admin import charts
from tests.admin.conftest import AS_OF, AdminEnv
from tests.admin.test_security import SOURCE, flashes, rule_form


def test_rules_list_shows_status_version_runs_and_sparkline(admin_env: AdminEnv) -> None:
    ana = admin_env.as_user("ana")
    ana.post("/admin/rules", rule_form())
    ana.post("/admin/rules", rule_form(key="other", name="Other rule"))
    admin_env.container.rules.quarantine("other", 1, "timeout on a profile", 1002)
    page = ana.client.get("/admin/").text
    row = re.search(r'<tr data-key="vr-soon">(.*?)</tr>', page, re.S).group(1)
    assert "draft" in row and ">1<" in row
    other = re.search(r'<tr data-key="other">(.*?)</tr>', page, re.S).group(1)
    assert "quarantined" in other and "timeout on a profile" in other and "user 1002" in other
    assert "No runs yet" in page
    pat = admin_env.as_user("pat")
    r = pat.post("/admin/runs", {"as_of": "2026-11-24"})
    assert r.url.path.startswith("/admin/runs/")
    assert 'data-testid="run-detail"' in r.text
    admin_env.container.runs.wait(1, timeout=1)  # no workers here: the run stays "running"
    page = ana.client.get("/admin/").text
    assert "Last run: <a" in page and 'class="spark"' in page


def test_live_validation_reports_lines_and_templates(admin_env: AdminEnv) -> None:
    ana = admin_env.as_user("ana")
    bad = {
        "source": "def match(profile, ctx):\n    x = 1\n    import os\n    return True\n",
        "banner_title": "Hi {{ profile.name",
        "key": "",
        "name": "",
    }
    r = ana.post("/admin/api/validate", bad, headers={"X-Requested-With": "fetch"})
    problems = r.json()["problems"]
    assert {p["field"] for p in problems} == {"source", "banner.title"}
    assert next(p for p in problems if p["field"] == "source")["line"] == 3
    ok = ana.post("/admin/api/validate", {"source": SOURCE}).json()
    assert ok == {"ok": True, "problems": []}


def test_examples_and_template_preview_fragments(admin_env: AdminEnv) -> None:
    ana = admin_env.as_user("ana")
    html = ana.post("/admin/api/examples", rule_form(ex_expect=["true", "true"])).text
    assert "1 of 2 examples pass" in html and html.count('class="pass"') == 1
    html = ana.post("/admin/api/render", rule_form() | {"preview_user": "1001"}).text
    assert "Registration A123BC" in html
    html = ana.post("/admin/api/render", rule_form() | {"preview_user": "999999"}).text
    assert "no profile for user 999999" in html
    html = ana.post("/admin/api/render", rule_form() | {"preview_profile": "[1, 2]"}).text
    assert "must be a JSON object" in html


def test_editor_keeps_input_on_errors_and_skips_unchanged_saves(admin_env: AdminEnv) -> None:
    ana = admin_env.as_user("ana")
    r = ana.post(
        "/admin/rules",
        rule_form(
            source="def match(profile, ctx):\n    return (\n", ex_profile=["{not json", "{}"]
        ),
    )
    assert r.status_code == 422
    assert (
        "not valid JSON" in r.text
        and "{not json" in r.text
        and "Vehicle registration soon" in r.text
    )
    ana.post("/admin/rules", rule_form())
    page = ana.client.get("/admin/rules/vr-soon").text
    assert "<code>vehicle.registration_expires_on</code>: only a change to these" in page
    r = ana.post("/admin/rules/vr-soon", rule_form())
    assert "No changes" in " ".join(flashes(r.text))
    assert admin_env.container.rules.get("vr-soon")["version"] == 1
    r = ana.post("/admin/rules", rule_form())
    assert r.status_code == 409 and "exists" in r.text


def test_preview_forecast_diff_and_shadow(admin_env: AdminEnv) -> None:
    ana = admin_env.as_user("ana")
    ana.post("/admin/rules", rule_form())
    ana.post("/admin/rules/vr-soon", rule_form(source=SOURCE.replace("<= 14", "<= 30")))
    html = ana.post("/admin/rules/vr-soon/preview", {"as_of": "2026-11-24", "sample": "all"}).text
    audience = admin_env.container.rules.preview("vr-soon", AS_OF, "all")["audience"]["estimate"]
    assert f"<strong>{audience}</strong> users match as of 2026-11-24" in html and "exact" in html
    html = ana.post("/admin/rules/vr-soon/forecast", {"from": "2026-11-25", "days": "10"}).text
    assert html.count("<rect") == 10 and 'data-testid="forecast-chart"' in html
    html = ana.client.get("/admin/rules/vr-soon/diff?a=1&b=2").text
    assert '<span class="del">-    return left is not None and 0 &lt;= left &lt;= 14</span>' in html
    assert '<span class="add">+    return left is not None and 0 &lt;= left &lt;= 30</span>' in html
    html = ana.post(
        "/admin/rules/vr-soon/shadow", {"version": "1", "as_of": "2026-11-24", "sample": "all"}
    ).text
    gained = re.search(r'class="good">\+(\d+)<', html).group(1)
    lost = re.search(r'class="bad">−(\d+)<', html).group(1)
    assert int(gained) > 0 and lost == "0"  # a wider window only gains users
    page = ana.client.get("/admin/rules/vr-soon/launch").text
    assert 'name="a"' in page and "v1 → v2" not in page  # the diff loads on demand


def test_approvals_history_runs_users_guide_settings(admin_env: AdminEnv) -> None:
    ana = admin_env.as_user("ana")
    ana.post("/admin/rules", rule_form())
    ana.post("/admin/rules/vr-soon/activation", {"note": "ship it"})
    page = ana.client.get("/admin/approvals").text
    assert "vr-soon" in page and "ship it" in page
    hist = ana.client.get("/admin/rules/vr-soon/history").text
    assert "activation.request" in hist and "rule.create" in hist and ">ana<" in hist
    assert ana.client.get("/admin/runs").status_code == 200
    assert "Helpers" in ana.client.get("/admin/rules/vr-soon").text
    guide = ana.client.get("/admin/guide").text
    assert "days_until" in guide
    root = admin_env.as_user("root")
    r = root.post("/admin/users", {"username": "newbie", "role": "analyst", "password": "p" * 12})
    assert "Added newbie" in " ".join(flashes(r.text))
    r = root.post("/admin/users", {"username": "newbie", "role": "analyst", "password": "p" * 12})
    assert r.status_code == 422 and "exists" in r.text
    r = root.post("/admin/users/root", {"action": "role", "role": "analyst"})
    assert r.status_code == 422 and "yourself" in r.text
    assert "KVADRUPEL_ADMIN_APPROVAL_AUDIENCE" in root.client.get("/admin/settings").text
    assert "s" * 40 not in root.client.get("/admin/settings").text  # no secrets


def test_chart_geometry() -> None:
    s = charts.sparkline([0, 5, 10])
    assert s["points"].split()[-1] == "120,2" and s["max"] == 10
    assert charts.sparkline([3])["n"] == 1
    b = charts.bars([("d1", 4, 2, 6), ("d2", 0, None, None)])
    assert b["max"] == 6 and "wx" in b["bars"][0] and "wx" not in b["bars"][1]
    line = charts.lines(["r1", "r2"], {"a": [1, 2], "b": [0, 0]})
    assert [x["name"] for x in line["series"]] == ["a", "b"]


def test_saving_from_the_form_keeps_fields_the_form_does_not_edit(admin_env: AdminEnv) -> None:
    # Given a rule whose banner has a translation and an expiry set through the REST API
    ana = admin_env.as_user("ana")
    ana.post("/admin/rules", rule_form())
    svc = admin_env.container.rules
    cur = svc.get("vr-soon")
    from rules.models import RuleIn

    data = {k: cur[k] for k in RuleIn.model_fields if k in cur} | {"enabled": False}
    data["banner"] = dict(data["banner"]) | {
        "translations": {"en": {"title": "Registration expires soon"}},
        "expires_at": "2026-12-31",
    }
    svc.update("vr-soon", RuleIn.model_validate(data))
    # When an analyst changes the source in the editor and saves
    r = ana.post("/admin/rules/vr-soon", rule_form(source=SOURCE.replace("<= 14", "<= 30")))
    assert r.status_code == 200
    # Then the new version still carries the translation and the expiry
    saved = svc.get("vr-soon")
    assert saved["version"] == 3 and "<= 30" in saved["source"]
    assert saved["banner"]["translations"]["en"]["title"] == "Registration expires soon"
    assert saved["banner"]["expires_at"] == "2026-12-31"


def test_run_page_shows_the_cpu_each_rule_used_per_user(admin_env: AdminEnv) -> None:
    # Given a run whose ranges finished with CPU figures per rule (as evaluators report)
    pat = admin_env.as_user("pat")
    run_id = int(pat.post("/admin/runs", {"as_of": "2026-11-24"}).url.path.rsplit("/", 1)[1])
    runs = admin_env.container.runs
    jobs = runs.jobs(run_id)
    assert jobs
    for job in jobs:
        runs.claim(run_id, job.range_no, "w1")
        runs.range_done(run_id, job.range_no, 1000, {"vr-soon": 10}, {}, worker="w1",
                        rule_cpu={"vr-soon": 0.25, "other": 0.01})

    # When the run page is shown
    page = pat.client.get(f"/admin/runs/{run_id}").text

    # Then each rule's CPU per user evaluated is there
    users = 1000 * len(jobs)
    row = re.search(r'<a href="/admin/rules/vr-soon">.*?</tr>', page, re.S).group(0)
    assert f'data-testid="rule-cpu">{0.25 * len(jobs) / users * 1e6:.1f}<' in row
    assert runs.get(run_id)["rule_cpu"]["vr-soon"]["seconds"] == round(0.25 * len(jobs), 3)


def test_run_page_shows_what_an_incremental_night_skipped_and_missed(
        admin_env: AdminEnv) -> None:
    from datetime import date

    # Given a verifying night: 2 ranges, 30 users due each, 50 swept, one mismatch
    runs = admin_env.container.runs
    run_id, _ = runs.create(date(2026, 11, 24), [(0, 1, 100, 500), (1, 101, 200, 500)],
                            kind="nightly", mode="verify", sweep=["vr-soon"],
                            covers={"vr-soon": 2})
    for no, mismatches in ((0, 1), (1, 0)):
        runs.claim(run_id, no, "w1")
        runs.range_done(run_id, no, 30, {}, {}, worker="w1", swept=50, mismatches=mismatches)

    # When the run page is shown / Then it says what was due, skipped, swept and missed
    page = admin_env.as_user("pat").client.get(f"/admin/runs/{run_id}").text
    line = re.search(r'data-testid="run-incremental">(.*?)</p>', page, re.S).group(1)
    assert "60 users due" in line and "940 skipped" in line and "100 swept" in line
    assert "<code>vr-soon</code>" in line and "1 mismatches" in line
    assert runs.get(run_id)["mismatches"] == 1 and runs.get(run_id)["status"] == "done"
