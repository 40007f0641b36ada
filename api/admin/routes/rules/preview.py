"""Trying a rule before it goes live: the test panel (one profile, with "why"), and
the launch page's preview, forecast, version diff and shadow comparison."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import Response

from api.admin import charts
from api.admin.pages import render
from api.admin.routes.rules.common import (
    DATE_NOTE,
    LOOKAHEAD_DAYS,
    call_optional,
    ever_live_keys,
    form_date,
    is_live,
    load_profile,
    router,
    rule_in,
    rule_service,
    sample_setting,
    status_of,
    today,
)
from api.admin.security import AnyUser, CsrfForm
from base.errors import KvadrupelError

MAX_FORECAST_DAYS = 90


# -- test panel -------------------------------------------------------------------
@router.post("/rules/{key}/test")
def test_rule(key: str, request: Request, form: CsrfForm, user: AnyUser) -> Response:
    profile, label, err = load_profile(
        request, str(form.get("user_id") or ""), str(form.get("profile") or "")
    )
    as_of = form_date(form.get("as_of"), today(request))
    result = None
    if profile is not None:
        try:
            result = rule_service(request).test(key, profile, as_of)
        except KvadrupelError as exc:
            err = str(exc)
    rule = rule_service(request).get(key)
    why = (result or {}).get("why")
    if result is not None and why is None:
        why = _explain(request, rule, profile, as_of)
    return render(
        request,
        "_test_result.html",
        result=result,
        error=err,
        label=label,
        as_of=as_of,
        why=why,
        version=rule["version"],
    )


def _explain(request: Request, rule: dict[str, Any], profile: Any, as_of: date) -> Any:
    """The fields the rule read, from the rules package's own explainer (the one the
    evaluator uses for "why do I see this?"), run in a sandbox child."""
    try:
        return rule_service(request).runner.explain(
            rule["key"], rule["version"], rule["source"], profile, as_of,
            request.app.state.settings.timezone)
    except KvadrupelError as exc:
        return {"error": str(exc), "fields": {}}


# -- the launch page: preview, forecast, diff, shadow -------------------------------
@router.get("/rules/{key}/launch")
def launch_page(key: str, request: Request, user: AnyUser) -> Response:
    svc = rule_service(request)
    rule = svc.get(key)
    st = request.app.state
    versions = svc.versions(key)
    results = svc.run_examples(rule_in(rule, enabled=False))
    history = st.activations.history(key)
    live_versions = [h["version"] for h in history if h["status"] in ("approved", "auto-approved")]
    compare_to = next(
        (v for v in live_versions if v != rule["version"]),
        rule["version"] - 1 if rule["version"] > 1 else rule["version"],
    )
    return render(
        request,
        "rule_launch.html",
        rule=rule,
        tab="launch",
        versions=versions,
        results=results,
        pending=st.activations.pending(key),
        history=history,
        today=today(request),
        compare_to=compare_to,
        live=is_live(rule),
        rule_status=status_of(rule, ever_live_keys(request)),
        threshold=st.settings.admin_approval_audience,
        default_sample=sample_setting(request, None),
        date_dep=call_optional(request, "date_dependence", key)[0],
        date_note=DATE_NOTE,
        lookahead_days=LOOKAHEAD_DAYS,
    )


@router.post("/rules/{key}/preview")
def preview(key: str, request: Request, form: CsrfForm, user: AnyUser) -> Response:
    as_of = form_date(form.get("as_of"), today(request))
    result, err = call_optional(
        request, "preview", key, as_of, sample_setting(request, str(form.get("sample") or ""))
    )
    return render(request, "_preview.html", p=result, error=err, key=key)


@router.post("/rules/{key}/forecast")
def forecast(key: str, request: Request, form: CsrfForm, user: AnyUser) -> Response:
    start = form_date(form.get("from"), today(request) + timedelta(days=1))
    try:
        days = max(1, min(int(str(form.get("days") or 30)), MAX_FORECAST_DAYS))
    except ValueError:
        days = 30
    result, err = call_optional(
        request, "forecast", key, start, days,
        sample_setting(request, str(form.get("sample") or "")),
    )
    chart = None
    if result is not None:
        items = [
            (
                d["date"],
                float(d.get("estimate", d.get("sampled", 0))),
                None if d.get("exact") else d.get("low"),
                None if d.get("exact") else d.get("high"),
            )
            for d in result.get("days", [])
        ]
        chart = charts.bars(items)
    return render(request, "_forecast.html", f=result, chart=chart, error=err)


@router.get("/rules/{key}/diff")
def diff(key: str, request: Request, a: int, b: int, user: AnyUser) -> Response:
    result, err = call_optional(request, "diff", key, a, b)
    return render(request, "_diff.html", d=result, error=err)


@router.post("/rules/{key}/shadow")
def shadow(key: str, request: Request, form: CsrfForm, user: AnyUser) -> Response:
    """The current version against another one: who would gain or lose the match.
    RuleService.shadow compares its ``active`` (the current version) with a candidate,
    so "current gains" is the candidate's "lose" and the other way round."""
    as_of = form_date(form.get("as_of"), today(request))
    try:
        other = int(str(form.get("version") or ""))
    except ValueError:
        raise HTTPException(422, "choose a version to compare with") from None
    current = rule_service(request).get(key)["version"]
    result, err = call_optional(
        request,
        "shadow",
        key,
        as_of,
        sample_setting(request, str(form.get("sample") or "")),
        version=other,
    )
    return render(request, "_shadow.html", s=result, error=err, other=other, current=current)
