"""The experiment report on a rule's page, in headless Chromium: conversion rate per
arm as an inline SVG chart with the 95 % intervals as whiskers, the uplift table,
the sample-ratio line and the verdict — the same figures as the REST report."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, timedelta

import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import Browser, expect

from api.app import create_app
from channels.goals import Conversion, Exposure, record_conversions, record_exposures
from channels.holdouts import arm_of
from rules.models import RuleIn
from tests.admin.conftest import TOKENS, LiveServer
from tests.admin.test_browser import Session
from tests.admin.test_browser import browser as browser  # noqa: F401 - the fixture
from tests.rules.test_goals import RULE

D0 = date(2026, 11, 20)


@pytest.fixture
def experiment(live_server: LiveServer) -> Iterator[LiveServer]:
    c = live_server.container
    c.rules.create(RuleIn(key="renew", name="Renew", source=RULE, holdout=50.0,
                          banner={"title": "Renew"}))
    users = range(7_000_000, 7_002_000)
    arm = {u: arm_of(u, "renew", 50.0, 0.0) for u in users}
    # treated users convert 30 %, held-out ones 10 %: a clear effect
    converted = [u for u in users if u % 10 < (3 if arm[u] == "treatment" else 1)]
    per: dict[int, tuple[list[Exposure], list[Conversion]]] = {}
    for u in users:
        per.setdefault(c.shards.router.shard_of(u), ([], []))[0].append(
            Exposure("renew", u, 1, 1, arm[u], D0))
    for u in converted:
        per[c.shards.router.shard_of(u)][1].append(
            Conversion("renew", u, 1, D0, D0 + timedelta(days=2)))
    for shard, (exp, conv) in per.items():
        record_exposures(c.shards.stores[shard], exp)
        assert record_conversions(c.shards.stores[shard], conv) == len(conv)
        assert record_conversions(c.shards.stores[shard], conv) == 0  # once per episode
    yield live_server


def test_the_rule_page_charts_conversions_per_arm_with_intervals(
        experiment: LiveServer, browser: Browser) -> None:  # noqa: F811
    with TestClient(create_app(experiment.container)) as client:
        rest = client.get("/v1/rules/renew/experiment",
                          headers={"Authorization": f"Bearer {TOKENS['admin_token']}"}).json()
    s = Session(browser, experiment.url)
    try:
        s.login("ana")
        s.goto("/admin/rules/renew")
        s.page.get_by_test_id("tab-experiment").click()
        expect(s.page).to_have_url(f"{experiment.url}/admin/rules/renew/experiment")
        chart = s.page.get_by_test_id("experiment-chart")
        expect(chart).to_be_visible()
        # one bar per arm with users, each with its interval
        expect(chart.locator("g.bar")).to_have_count(2)
        expect(chart.get_by_test_id("interval")).to_have_count(2)
        treated = chart.locator('g.bar[data-arm="treatment"] rect')
        held = chart.locator('g.bar[data-arm="holdout"] rect')
        assert float(treated.get_attribute("height") or 0) > 2 * float(
            held.get_attribute("height") or 0)
        by_arm = {a["arm"]: a for a in rest["by_arm"]}
        row = s.page.locator('[data-testid="experiment-arms"] tr[data-arm="treatment"]')
        expect(row.locator("td").nth(2)).to_have_text(str(by_arm["treatment"]["converted"]))
        expect(row.locator("td").nth(3)).to_have_text(f"{100 * by_arm['treatment']['rate']:.2f} %")
        expect(s.page.get_by_test_id("experiment-verdict")).to_have_text(rest["verdict"])
        assert "a real effect" in rest["verdict"]
        comp = rest["analysis"]["comparisons"][0]["absolute_uplift"]
        expect(s.page.get_by_test_id("experiment-uplift")).to_contain_text(
            f"{100 * comp['low']:+.2f} to {100 * comp['high']:+.2f}")
        expect(s.page.get_by_test_id("experiment-srm")).to_contain_text(
            "consistent with the configured split")
        s.shot("rule-experiment")
    finally:
        s.close()
