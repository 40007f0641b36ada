"""Approval looks ahead (issue 14, item 5): the blast radius is the larger of today's
audience and the users the rule would match on any day of the next 365, so a time
bomb (``ctx.today >= date(tomorrow)``) needs an approver; the approval screens say
when a rule's answer depends on today's date."""

from __future__ import annotations

import html
import re
from datetime import timedelta
from typing import Any

from api.admin.store import ActivationStore, AuditLog
from tests.admin.conftest import AS_OF, PROFILES, AdminEnv
from tests.admin.test_security import flashes, rule_form

NOTE = "this rule's answer depends on today's date"
TOMORROW = (AS_OF + timedelta(days=1)).isoformat()


def _form(key: str, body: str, examples: list[tuple[str, str, bool]]) -> dict[str, Any]:
    return rule_form(
        key=key,
        name=key,
        source="def match(profile, ctx):\n" + body,
        ex_name=[f"ex{i}" for i in range(len(examples))],
        ex_as_of=[a for a, _, _ in examples],
        ex_expect=["true" if e else "false" for _, _, e in examples],
        ex_profile=[p for _, p, _ in examples],
    )


def _text(r: Any) -> str:
    return html.unescape(r.text)


def _activate(env: AdminEnv, form: dict[str, Any]) -> str:
    ana = env.as_user("ana")
    assert ana.post("/admin/rules", form).status_code == 200
    r = ana.post(f"/admin/rules/{form['key']}/activation", {"note": "small"})
    return html.unescape(" ".join(flashes(r.text)))


def test_time_bomb_needs_an_approver(admin_env: AdminEnv) -> None:
    """Matches no one today and everyone tomorrow: before the lookahead it went live
    with "blast radius 0 ≤ 10: no approval needed"."""
    admin_env.container.settings.admin_approval_audience = 10
    form = _form(
        "bomb",
        f"    return ctx.today >= date('{TOMORROW}')\n",
        [(AS_OF.isoformat(), "{}", False), (TOMORROW, "{}", True)],
    )
    msg = _activate(admin_env, form)
    n = len(PROFILES)
    assert "must approve" in msg and f"blast radius up to {n} users > 10" in msg, msg
    assert "today up to 0" in msg and f"on any day of the next 365 days {n}" in msg
    assert NOTE in msg
    assert admin_env.container.rules.get("bomb")["enabled"] is False
    (req,) = ActivationStore(admin_env.container.control).pending("bomb")
    assert req["audience"] == n
    (entry,) = [
        e for e in AuditLog(admin_env.container.control).list(target="rule:bomb")
        if e["action"] == "activation.request"
    ]
    assert entry["detail"]["audience_today"] == 0
    assert entry["detail"]["audience_lookahead"] == n
    assert entry["detail"]["date_dependent"] is True

    # The approval screens: the blast fragment, the launch page, the approvals list.
    pat = admin_env.as_user("pat")
    blast = _text(pat.client.get("/admin/rules/bomb/blast"))
    assert "Blast radius today: <strong>0</strong>" in blast
    ahead = re.search(r'data-testid="blast-lookahead">(.*?)</p>', blast, re.S).group(1)
    assert f"<strong>{n}</strong> users (exact" in ahead
    assert f"start matching from {TOMORROW}" in ahead
    note = re.search(r'data-testid="date-dependent">(.*?)</p>', blast, re.S).group(1)
    assert NOTE in note and "reads ctx.today" in note
    assert "Activation needs an approver" in blast
    launch = _text(pat.client.get("/admin/rules/bomb/launch"))
    assert 'data-testid="date-dependent-source"' in launch and NOTE in launch
    assert f"blast radius up to {n} users (today or within the next 365 days)" in launch
    approvals = _text(pat.client.get("/admin/approvals"))
    row = re.search(r"<tr><td><a[^>]*/rules/bomb/launch.*?</tr>", approvals, re.S).group(0)
    assert NOTE in row and 'data-testid="date-dependent"' in row


def test_december_rule_needs_an_approver(admin_env: AdminEnv) -> None:
    admin_env.container.settings.admin_approval_audience = 10
    form = _form(
        "december",
        "    return ctx.today.month == 12\n",
        [(AS_OF.isoformat(), "{}", False), ("2026-12-01", "{}", True)],
    )
    msg = _activate(admin_env, form)
    assert "must approve" in msg and NOTE in msg, msg
    assert admin_env.container.rules.get("december")["enabled"] is False


def test_date_independent_rule_lookahead_equals_today(admin_env: AdminEnv) -> None:
    cars = sum("vehicle" in d for d in PROFILES.values())
    admin_env.container.settings.admin_approval_audience = cars  # exactly today's count
    form = _form(
        "has-car",
        "    return has(profile, 'vehicle')\n",
        [(AS_OF.isoformat(), '{"vehicle": {}}', True), (AS_OF.isoformat(), "{}", False)],
    )
    msg = _activate(admin_env, form)
    assert "no approval needed" in msg, msg
    assert f"today up to {cars}" in msg and f"on any day of the next 365 days {cars}" in msg
    assert NOTE not in msg
    assert admin_env.container.rules.get("has-car")["enabled"] is True
    blast = _text(admin_env.as_user("pat").client.get("/admin/rules/has-car/blast"))
    assert f"<strong>{cars}</strong> users (exact" in blast
    assert 'data-testid="date-dependent"' not in blast and NOTE not in blast
    assert "Small enough to activate without an approver" in blast


def test_rule_that_starts_matching_in_200_days_counts_those_users(admin_env: AdminEnv) -> None:
    later = (AS_OF + timedelta(days=200)).isoformat()
    shards = admin_env.container.shards
    extra = {9000 + i: {"name": f"late {i}", "permit": {"expires_on": later}} for i in range(5)}
    for uid, doc in extra.items():
        shards.stores[shards.router.shard_of(uid)].put_profiles([(uid, doc)])
    admin_env.container.settings.admin_approval_audience = 2
    form = _form(
        "permit",
        "    return days_until(get(profile, 'permit.expires_on'), ctx) == 0\n",
        [
            (later, '{"permit": {"expires_on": "' + later + '"}}', True),
            (AS_OF.isoformat(), "{}", False),
        ],
    )
    msg = _activate(admin_env, form)
    assert "must approve" in msg and "today up to 0" in msg, msg
    assert "on any day of the next 365 days 5" in msg and NOTE in msg
    blast = _text(admin_env.as_user("pat").client.get("/admin/rules/permit/blast"))
    assert f"start matching from {later}" in blast and "calls days_until(…, ctx)" in blast
