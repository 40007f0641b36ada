"""Going live: the blast radius, asking for activation (automatic under the
threshold), an approver's approval or rejection, the requester's withdrawal, pausing.

Every action ends the same way (:func:`_finish`): recorded in the audit log, a
message for the user, back to the rule's launch page.
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import Response

from api.admin.pages import flash, redirect, render
from api.admin.routes.rules.common import (
    DATE_NOTE,
    LOOKAHEAD_DAYS,
    audit,
    call_optional,
    is_live,
    router,
    rule_in,
    rule_service,
    sample_setting,
    today,
)
from api.admin.security import APPROVERS, AnyUser, Approver, CsrfForm, Editor
from base.errors import NotFound, RuleValidationError


# -- blast radius -------------------------------------------------------------------
def _high(result: dict[str, Any] | None) -> int | None:
    if result is None:
        return None
    aud = result.get("audience") or {}
    high = aud.get("high", aud.get("estimate", result.get("matches")))
    return int(high) if high is not None else None


def _blast_radius(request: Request, key: str) -> dict[str, Any]:
    """What the approval rule compares with the threshold: the larger of the upper
    bounds of today's audience (preview) and of the users the rule would match on any
    day of the next 365 (lookahead), over the same sample setting. Unknown (``high``
    None, so an approver is needed) when either cannot be computed.

    ``{"high", "today", "today_high", "ahead", "ahead_high", "error", "ahead_error"}``.
    """
    day, sample = today(request), sample_setting(request, None)
    p, err = call_optional(request, "preview", key, day, sample)
    ahead, ahead_err = call_optional(request, "lookahead", key, day, LOOKAHEAD_DAYS, sample)
    today_high, ahead_high = _high(p), _high(ahead)
    high = None if today_high is None or ahead_high is None else max(today_high, ahead_high)
    return {"high": high, "today": p, "today_high": today_high, "ahead": ahead,
            "ahead_high": ahead_high, "error": err, "ahead_error": ahead_err}


def _blast_text(b: dict[str, Any]) -> str:
    """Today's and the lookahead's counts in words, for flash messages."""
    parts = [f"today up to {b['today_high']}" if b["today_high"] is not None
             else f"today unknown ({b['error']})"]
    ahead = b["ahead"]
    if ahead is None:
        parts.append(f"next {LOOKAHEAD_DAYS} days unknown ({b['ahead_error']})")
    else:
        text = f"on any day of the next {ahead.get('days', LOOKAHEAD_DAYS)} days "
        if ahead.get("unbounded"):
            text += f"up to {b['ahead_high']} (reads the real clock: counted as everyone)"
        elif (ahead.get("audience") or {}).get("exact"):
            text += f"{b['ahead_high']}"
        else:
            text += f"up to {b['ahead_high']} (upper bound, sampled)"
        parts.append(text)
        if ahead.get("date_dependent"):
            parts.append(DATE_NOTE)
    return "; ".join(parts)


@router.get("/rules/{key}/blast")
def blast(key: str, request: Request, user: AnyUser) -> Response:
    b = _blast_radius(request, key)
    threshold = request.app.state.settings.admin_approval_audience
    return render(
        request,
        "_blast.html",
        p=b["today"],
        la=b["ahead"],
        high=b["high"],
        error=b["error"],
        ahead_error=b["ahead_error"],
        threshold=threshold,
        needs_approver=b["high"] is None or b["high"] > threshold,
        date_note=DATE_NOTE,
    )


# -- how every action ends ------------------------------------------------------------
def _back(request: Request, key: str, message: str, level: str = "ok") -> Response:
    """Back to the rule's launch page, showing ``message``."""
    flash(request, message, level)
    return redirect(request, f"/rules/{key}/launch")


def _finish(request: Request, user: dict[str, Any], action: str, key: str, message: str,
            level: str, /, **detail: Any) -> Response:
    """Record ``action`` on rule ``key`` (with ``detail``) in the audit log, then back to
    the launch page showing ``message``."""
    audit(request, user, action, key, **detail)
    return _back(request, key, message, level)


def _request_of(request: Request, key: str, rid: int) -> dict[str, Any]:
    """Activation request ``rid``, which must be one for rule ``key``."""
    req: dict[str, Any] = request.app.state.activations.get(rid)
    if req["rule_key"] != key:
        raise NotFound(f"no activation request {rid} for {key!r}")
    return req


def _version_author(request: Request, key: str, version: int) -> str | None:
    for v in rule_service(request).versions(key):
        if v["version"] == version:
            author: str | None = v.get("author")
            return author
    return None


# -- the actions ----------------------------------------------------------------------
@router.post("/rules/{key}/activation")
def request_activation(key: str, request: Request, form: CsrfForm, user: Editor) -> Response:
    svc, st = rule_service(request), request.app.state
    rule = svc.get(key)
    if is_live(rule):
        return _back(request, key, f"{key} v{rule['version']} is already live.", "info")
    failed = [r for r in svc.run_examples(rule_in(rule, enabled=False)) if not r["ok"]]
    if failed:
        return _back(
            request,
            key,
            "Examples must pass before activation: " + ", ".join(r["name"] for r in failed),
            "error",
        )
    b = _blast_radius(request, key)
    high = b["high"]
    err = "; ".join(e for e in (b["error"], b["ahead_error"]) if e) or None
    ahead = b["ahead"] or {}
    detail = {
        "audience_today": b["today_high"],
        "audience_lookahead": b["ahead_high"],
        "lookahead_days": LOOKAHEAD_DAYS,
        "lookahead_sampled": not (ahead.get("audience") or {}).get("exact", False),
        "date_dependent": ahead.get("date_dependent"),
    }
    words = _blast_text(b)
    note = str(form.get("note") or "").strip()[:2000] or None
    threshold = st.settings.admin_approval_audience
    if high is not None and high <= threshold:
        try:
            svc.set_enabled(key, True)
        except RuleValidationError as exc:
            return _back(request, key, "Cannot activate: " + str(exc), "error")
        req = st.activations.create(
            key, rule["version"], user["username"], high, note, status="auto-approved"
        )
        return _finish(
            request, user, "activation.auto", key,
            f"{key} v{rule['version']} is live (blast radius {high} ≤ {threshold}: "
            f"no approval needed; {words}).",
            "ok",
            request_id=req["id"], version=rule["version"], audience=high, threshold=threshold,
            **detail,
        )
    req = st.activations.create(key, rule["version"], user["username"], high, note)
    why = (
        f"blast radius up to {high} users > {threshold}"
        if high is not None
        else f"blast radius unknown ({err})"
    )
    return _finish(
        request, user, "activation.request", key,
        f"Activation of {key} v{rule['version']} requested: {why} ({words}), "
        "so an approver (not you) must approve it.",
        "info",
        request_id=req["id"], version=rule["version"], audience=high, threshold=threshold,
        note=note, audience_error=err, **detail,
    )


@router.post("/rules/{key}/activation/{rid}/approve")
def approve(key: str, rid: int, request: Request, form: CsrfForm, user: Approver) -> Response:
    svc, st = rule_service(request), request.app.state
    req = _request_of(request, key, rid)
    if req["status"] != "pending":
        raise HTTPException(409, f"request {rid} is {req['status']}, not pending")
    if req["requested_by"] == user["username"]:
        raise HTTPException(403, "you cannot approve your own request: another approver must")
    rule = svc.get(key)
    if rule["version"] != req["version"]:
        st.activations.decide(rid, "withdrawn", user["username"])
        raise HTTPException(
            409,
            f"{key} changed since the request (v{req['version']} → "
            f"v{rule['version']}): the request is withdrawn; ask for a new one",
        )
    author = _version_author(request, key, req["version"])
    if author == user["username"]:
        raise HTTPException(
            403, f"you wrote version {req['version']}: another approver must approve it"
        )
    if not st.activations.decide(rid, "approved", user["username"]):
        raise HTTPException(409, "someone else decided this request first")
    try:
        svc.set_enabled(key, True)
    except RuleValidationError as exc:
        st.activations.reopen(rid)
        return _back(request, key, "Cannot activate: " + str(exc), "error")
    if svc.get(key)["version"] != req["version"]:  # saved again while we were approving
        svc.set_enabled(key, False)
        st.activations.decide(rid, "withdrawn", user["username"], expect="approved")
        raise HTTPException(409, f"{key} changed while approving: left paused")
    return _finish(
        request, user, "activation.approve", key,
        f"Approved: {key} v{req['version']} is live.", "ok",
        request_id=rid, version=req["version"], requested_by=req["requested_by"],
        audience=req["audience"],
    )


@router.post("/rules/{key}/activation/{rid}/decline")
def decline(key: str, rid: int, request: Request, form: CsrfForm, user: Editor) -> Response:
    """The requester withdraws their request; an approver rejects someone else's."""
    req = _request_of(request, key, rid)
    if req["requested_by"] == user["username"]:
        status = "withdrawn"
    elif user["role"] in APPROVERS:
        status = "rejected"
    else:
        raise HTTPException(403, "only the requester or an approver can decline a request")
    if not request.app.state.activations.decide(rid, status, user["username"]):
        raise HTTPException(409, f"request {rid} is no longer pending")
    action = "activation.withdraw" if status == "withdrawn" else "activation.reject"
    return _finish(
        request, user, action, key, f"Request {rid} {status}.", "info",
        request_id=rid, version=req["version"],
        note=str(form.get("note") or "")[:2000] or None,
    )


@router.post("/rules/{key}/pause")
def pause(key: str, request: Request, form: CsrfForm, user: Approver) -> Response:
    svc = rule_service(request)
    before = svc.get(key)
    svc.set_enabled(key, False)
    return _finish(request, user, "rule.pause", key, f"{key} is paused.", "info",
                   version=before["version"], was=before["status"])
