"""The list of rules (with each one's status and recent matches), the list of
activation requests waiting for an approver, and the global control group (an
approver sets it)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response

from api.admin import charts
from api.admin.pages import flash, redirect, render
from api.admin.routes.rules.common import (
    DATE_NOTE,
    call_optional,
    ever_live_keys,
    router,
    rule_service,
    runs_oldest_first,
    status_of,
)
from api.admin.security import AnyUser, Approver, CsrfForm
from channels.holdouts import MAX_CONTROL, get_control_share, set_control_share


@router.get("/")
def rules_list(request: Request, user: AnyUser) -> Response:
    all_rules = rule_service(request).list()
    runs = runs_oldest_first(request)
    last = runs[-1] if runs else None
    ever_live = ever_live_keys(request)
    pending = {p["rule_key"] for p in request.app.state.activations.pending()}
    rows = []
    for r in all_rules:
        series = [run["matches"].get(r["key"], 0) for run in runs]
        rows.append(
            {
                "key": r["key"],
                "name": r["name"],
                "group": r["group"],
                "version": r["version"],
                "status": status_of(r, ever_live),
                "quarantine": r["quarantine"],
                "pending": r["key"] in pending,
                "last_matches": last["matches"].get(r["key"], 0) if last else None,
                "last_errors": last["errors"].get(r["key"], 0) if last else None,
                "spark": charts.sparkline(series) if series else None,
            }
        )
    return render(request, "rules.html", rows=rows, last=last, n_runs=len(runs))


@router.get("/approvals")
def approvals(request: Request, user: AnyUser) -> Response:
    pending = request.app.state.activations.pending()
    date_dep = {}
    for p in pending:
        dep, _ = call_optional(request, "date_dependence", p["rule_key"], p["version"])
        date_dep[p["id"]] = dep
    control = get_control_share(request.app.state.services.control)
    return render(
        request, "approvals.html", pending=pending, date_dep=date_dep, date_note=DATE_NOTE,
        control=control, control_max=MAX_CONTROL,
    )


@router.post("/control-group")
def set_control_group(request: Request, form: CsrfForm, user: Approver) -> Response:
    """The global control group's share (0–15 %): users sent nothing by any rule."""
    control = request.app.state.services.control
    before = get_control_share(control)
    raw = str(form.get("percent") or "").strip().replace(",", ".")
    try:
        pct = set_control_share(control, float(raw), user["username"],
                                request.app.state.services.clock.now())
    except ValueError as exc:
        msg = str(exc) if raw else "give the share in percent"
        flash(request, f"Not changed: {msg}.", "error")
        return redirect(request, "/approvals")
    request.app.state.audit.record(user["username"], "settings.control_group", "control-group",
                                   {"from": before, "to": pct})
    flash(request, f"The global control group is now {pct:g} % of users (was {before:g} %).")
    return redirect(request, "/approvals")
