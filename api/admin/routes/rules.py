"""Rules: the list, the editor with live validation and the test panel, preview,
forecast, version diff and shadow, and activation with approval.

Every read and write of a rule goes through ``container.rules`` (RuleService) —
the same calls the REST API makes.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import orjson
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import FormData

from api.admin import charts, helpdocs
from api.admin.app import flash, redirect, render
from api.admin.forms import editor_values, parse_profile, rule_from_form
from api.admin.security import APPROVERS, AnyUser, Approver, CsrfForm, Editor
from base.errors import Conflict, KvadrupelError, NotFound, RuleValidationError
from rules.models import RuleIn

router = APIRouter()

SPARK_RUNS = 30
MAX_FORECAST_DAYS = 90


# -- helpers ----------------------------------------------------------------------
def _svc(request: Request) -> Any:
    return request.app.state.container.rules


def _today(request: Request) -> date:
    return request.app.state.today()


def _audit(request: Request, user: dict[str, Any], action: str, key: str, **detail: Any) -> None:
    request.app.state.audit.record(
        user["username"], action, f"rule:{key}", orjson.loads(orjson.dumps(detail, default=str))
    )


# Parts of a rule's banner/e-mail the editor form does not show (set through the REST
# API): a save from the form keeps them from the current version instead of dropping them.
_UNEDITED = {
    "banner": ("translations", "expires_at", "push", "category", "importance"),
    "email": ("translations", "category", "importance"),
}


def _keep_unedited(rule: RuleIn, before: dict[str, Any]) -> RuleIn:
    data = rule.model_dump(mode="json", exclude_unset=True)
    changed = False
    for part, fields in _UNEDITED.items():
        old, new = before.get(part), data.get(part)
        if not old or not new:
            continue
        for f in fields:
            if old.get(f) is not None and f not in new:
                new[f] = old[f]
                changed = True
    return RuleIn.model_validate(data) if changed else rule


def _rule_in(rule: dict[str, Any], **overrides: Any) -> RuleIn:
    return RuleIn.model_validate({k: rule[k] for k in RuleIn.model_fields if k in rule} | overrides)


def _is_live(rule: dict[str, Any]) -> bool:
    return bool(rule["enabled"]) and rule["status"] == "active"


def _status(rule: dict[str, Any], ever_live: set[str]) -> str:
    if rule["status"] == "quarantined":
        return "quarantined"
    if _is_live(rule):
        return "active"
    return "paused" if rule["key"] in ever_live else "draft"


def _ever_live(request: Request) -> set[str]:
    st = request.app.state
    keys = st.activations.ever_approved()
    keys |= {
        e["target"].split(":", 1)[1]
        for e in st.audit.list(limit=1000)
        if e["action"] == "rule.pause" and e["target"]
    }
    return keys


def _sample(request: Request, text: str | None) -> int | str:
    text = (text or "").strip().lower()
    if text == "all":
        return "all"
    if text.isdigit() and int(text) > 0:
        return min(int(text), 10_000_000)
    default = request.app.state.settings.admin_preview_sample
    return default if default > 0 else "all"


def _date(text: Any, default: date) -> date:
    try:
        return date.fromisoformat(str(text)) if text else default
    except ValueError:
        raise HTTPException(422, f"not a date (YYYY-MM-DD): {str(text)[:40]!r}") from None


def _call(request: Request, method: str, *args: Any, **kwargs: Any) -> tuple[Any, str | None]:
    """Call an optional RuleService method: ``(result, None)`` or ``(None, why not)``."""
    fn = getattr(_svc(request), method, None)
    if fn is None:
        return None, f"{method} is not available in this version of the rule service"
    try:
        return fn(*args, **kwargs), None
    except RuleValidationError as exc:
        return None, "; ".join(str(p["message"]) for p in exc.problems)
    except (KvadrupelError, RuntimeError, ValueError) as exc:
        return None, str(exc) or type(exc).__name__


def _runs_oldest_first(request: Request, n: int = SPARK_RUNS) -> list[dict[str, Any]]:
    return list(reversed(request.app.state.container.runs.list(limit=n)))


def _with_key(form: FormData, key: str) -> FormData:
    items = [(k, v) for k, v in form.multi_items() if k not in ("key", "name")]
    return FormData(
        [*items, ("key", key), ("name", str(form.get("name") or "").strip() or "draft")]
    )


def _editor(
    request: Request,
    status: int = 200,
    *,
    rule: dict[str, Any] | None,
    values: dict[str, Any],
    problems: list[dict[str, Any]] | None = None,
    results: list[dict[str, Any]] | None = None,
) -> Response:
    pending = request.app.state.activations.pending(rule["key"]) if rule else []
    return render(
        request,
        "rule_edit.html",
        status,
        rule=rule,
        v=values,
        problems=problems or [],
        results=results,
        helpers=helpdocs.helper_reference(),
        has_guide=helpdocs.guide_html() is not None,
        today=_today(request),
        tab="edit",
        pending=pending,
        live=bool(rule and _is_live(rule)),
    )


def _load_profile(
    request: Request, user_id: str, profile_text: str
) -> tuple[dict[str, Any] | None, str, str | None]:
    """A profile from a user id (read from its shard) or pasted JSON."""
    user_id = user_id.strip()
    if user_id:
        if not user_id.isdigit() or not 0 < int(user_id) < 2**63:
            return None, "", "user id: a positive whole number"
        uid = int(user_id)
        doc = request.app.state.container.shards.for_user(uid).get_profile(uid)
        if doc is None:
            return None, "", f"no profile for user {uid}"
        return doc, f"user {uid}", None
    profile, err = parse_profile(profile_text)
    return profile, "pasted profile", err


# -- list -------------------------------------------------------------------------
@router.get("/")
def rules_list(
    request: Request,
    user: AnyUser,
) -> Response:
    all_rules = _svc(request).list()
    runs = _runs_oldest_first(request)
    last = runs[-1] if runs else None
    ever_live = _ever_live(request)
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
                "status": _status(r, ever_live),
                "quarantine": r["quarantine"],
                "pending": r["key"] in pending,
                "last_matches": last["matches"].get(r["key"], 0) if last else None,
                "last_errors": last["errors"].get(r["key"], 0) if last else None,
                "spark": charts.sparkline(series) if series else None,
            }
        )
    return render(request, "rules.html", rows=rows, last=last, n_runs=len(runs))


# -- editor -----------------------------------------------------------------------
@router.get("/new")
def new_rule(
    request: Request,
    user: Editor,
) -> Response:
    return _editor(request, rule=None, values=editor_values(None))


@router.post("/rules")
def create_rule(
    request: Request,
    form: CsrfForm,
    user: Editor,
) -> Response:
    svc = _svc(request)
    values, rule, problems = rule_from_form(form)
    if rule is not None:
        problems = svc.validate(rule)
    if rule is None or problems:
        return _editor(request, 422, rule=None, values=values, problems=problems)
    try:
        saved = svc.create(rule, author=user["username"])
    except RuleValidationError as exc:
        return _editor(request, 422, rule=None, values=values, problems=exc.problems)
    except Conflict as exc:
        return _editor(
            request,
            409,
            rule=None,
            values=values,
            problems=[{"field": "key", "line": None, "message": str(exc)}],
        )
    results = svc.run_examples(rule)
    _audit(
        request,
        user,
        "rule.create",
        rule.key,
        version=saved["version"],
        rule=rule.model_dump(mode="json", exclude={"enabled"}),
    )
    _flash_saved(request, saved, results)
    return redirect(request, f"/rules/{rule.key}")


def _flash_saved(request: Request, saved: dict[str, Any], results: list[dict[str, Any]]) -> None:
    ok = sum(r["ok"] for r in results)
    text = f"Saved {saved['key']} as version {saved['version']}"
    if results:
        text += f": {ok} of {len(results)} examples pass"
    flash(request, text, "ok" if ok == len(results) else "warn")


@router.get("/rules/{key}")
def edit_rule(
    key: str,
    request: Request,
    user: AnyUser,
) -> Response:
    svc = _svc(request)
    rule = svc.get(key)
    results = svc.run_examples(_rule_in(rule, enabled=False))
    return _editor(request, rule=rule, values=editor_values(rule), results=results)


@router.post("/rules/{key}")
def save_rule(
    key: str,
    request: Request,
    form: CsrfForm,
    user: Editor,
) -> Response:
    svc = _svc(request)
    before = svc.get(key)
    values, rule, problems = rule_from_form(form, key=key)
    if rule is not None:
        rule = _keep_unedited(rule, before)
        problems = svc.validate(rule)
    if rule is None or problems:
        return _editor(request, 422, rule=before, values=values, problems=problems)
    unchanged = _rule_in(before, enabled=False).model_dump(mode="json") == rule.model_dump(
        mode="json"
    )
    if unchanged:
        flash(request, f"No changes: {key} stays at version {before['version']}", "info")
        return redirect(request, f"/rules/{key}")
    try:
        saved = svc.update(key, rule, author=user["username"])
    except RuleValidationError as exc:
        return _editor(request, 422, rule=before, values=values, problems=exc.problems)
    results = svc.run_examples(rule)
    diff, _ = _call(request, "diff", key, before["version"], saved["version"])
    _audit(
        request,
        user,
        "rule.save",
        key,
        version=saved["version"],
        previous=before["version"],
        was_live=_is_live(before),
        diff=diff,
    )
    # A pending request was for the old version: it no longer applies.
    for p in request.app.state.activations.pending(key):
        request.app.state.activations.decide(p["id"], "withdrawn", user["username"])
    _flash_saved(request, saved, results)
    if _is_live(before):
        flash(request, "The rule was live: it is paused until this version is activated.", "warn")
    return redirect(request, f"/rules/{key}")


@router.post("/api/validate")
def validate(
    request: Request,
    form: CsrfForm,
    user: Editor,
) -> JSONResponse:
    """Live validation for the editor: sandbox and template problems with their lines."""
    key = str(form.get("key") or "").strip()
    from rules.models import KEY_RE

    _, rule, problems = rule_from_form(_with_key(form, key if KEY_RE.match(key) else "draft"))
    problems = [p for p in problems if not str(p["field"]).startswith("examples")]
    if rule is not None:
        problems = _svc(request).validate(rule)
    return JSONResponse({"ok": not problems, "problems": problems})


@router.post("/api/examples")
def run_examples(
    request: Request,
    form: CsrfForm,
    user: Editor,
) -> Response:
    """Run the examples in the editor (unsaved) through RuleService.run_examples."""
    _, rule, problems = rule_from_form(_with_key(form, "draft"))
    results = None
    if rule is not None:
        problems = _svc(request).validate(rule)
        if not problems:
            results = _svc(request).run_examples(rule)
    return render(request, "_examples.html", results=results, problems=problems)


@router.post("/api/render")
def render_templates(
    request: Request,
    form: CsrfForm,
    user: Editor,
) -> Response:
    """The banner/e-mail templates in the editor rendered for a chosen profile."""
    values, _, _ = rule_from_form(_with_key(form, "draft"))
    profile, label, err = _load_profile(
        request, str(form.get("preview_user") or ""), str(form.get("preview_profile") or "")
    )
    as_of = _date(form.get("preview_as_of"), _today(request))
    out: dict[str, Any] = {"label": label, "error": err, "as_of": as_of}
    if profile is not None:
        # Templates are analyst code: rendered in a sandbox child, never here.
        try:
            out |= _svc(request).runner.render(
                {"banner": values["banner"], "email": values["email"]}, profile, as_of,
                request.app.state.settings.timezone)
        except KvadrupelError as exc:
            out["banner_error"] = str(exc)
    return render(request, "_rendered.html", r=out)


# -- test panel -------------------------------------------------------------------
@router.post("/rules/{key}/test")
def test_rule(
    key: str,
    request: Request,
    form: CsrfForm,
    user: AnyUser,
) -> Response:
    profile, label, err = _load_profile(
        request, str(form.get("user_id") or ""), str(form.get("profile") or "")
    )
    as_of = _date(form.get("as_of"), _today(request))
    result = None
    if profile is not None:
        try:
            result = _svc(request).test(key, profile, as_of)
        except KvadrupelError as exc:
            err = str(exc)
    rule = _svc(request).get(key)
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
        return _svc(request).runner.explain(rule["key"], rule["version"], rule["source"],
                                            profile, as_of, request.app.state.settings.timezone)
    except KvadrupelError as exc:
        return {"error": str(exc), "fields": {}}


# -- preview, forecast, diff, shadow ----------------------------------------------
@router.get("/rules/{key}/launch")
def launch_page(
    key: str,
    request: Request,
    user: AnyUser,
) -> Response:
    svc = _svc(request)
    rule = svc.get(key)
    st = request.app.state
    versions = svc.versions(key)
    results = svc.run_examples(_rule_in(rule, enabled=False))
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
        today=_today(request),
        compare_to=compare_to,
        live=_is_live(rule),
        rule_status=_status(rule, _ever_live(request)),
        threshold=st.settings.admin_approval_audience,
        default_sample=_sample(request, None),
        date_dep=_call(request, "date_dependence", key)[0],
        date_note=DATE_NOTE,
        lookahead_days=LOOKAHEAD_DAYS,
    )


@router.post("/rules/{key}/preview")
def preview(
    key: str,
    request: Request,
    form: CsrfForm,
    user: AnyUser,
) -> Response:
    as_of = _date(form.get("as_of"), _today(request))
    result, err = _call(
        request, "preview", key, as_of, _sample(request, str(form.get("sample") or ""))
    )
    return render(request, "_preview.html", p=result, error=err, key=key)


@router.post("/rules/{key}/forecast")
def forecast(
    key: str,
    request: Request,
    form: CsrfForm,
    user: AnyUser,
) -> Response:
    start = _date(form.get("from"), _today(request) + timedelta(days=1))
    try:
        days = max(1, min(int(str(form.get("days") or 30)), MAX_FORECAST_DAYS))
    except ValueError:
        days = 30
    result, err = _call(
        request, "forecast", key, start, days, _sample(request, str(form.get("sample") or ""))
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
def diff(
    key: str,
    request: Request,
    a: int,
    b: int,
    user: AnyUser,
) -> Response:
    result, err = _call(request, "diff", key, a, b)
    return render(request, "_diff.html", d=result, error=err)


@router.post("/rules/{key}/shadow")
def shadow(
    key: str,
    request: Request,
    form: CsrfForm,
    user: AnyUser,
) -> Response:
    """The current version against another one: who would gain or lose the match.
    RuleService.shadow compares its ``active`` (the current version) with a candidate,
    so "current gains" is the candidate's "lose" and the other way round."""
    as_of = _date(form.get("as_of"), _today(request))
    try:
        other = int(str(form.get("version") or ""))
    except ValueError:
        raise HTTPException(422, "choose a version to compare with") from None
    current = _svc(request).get(key)["version"]
    result, err = _call(
        request,
        "shadow",
        key,
        as_of,
        _sample(request, str(form.get("sample") or "")),
        version=other,
    )
    return render(request, "_shadow.html", s=result, error=err, other=other, current=current)


# -- activation -------------------------------------------------------------------
LOOKAHEAD_DAYS = 365
DATE_NOTE = "this rule's answer depends on today's date"


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
    today, sample = _today(request), _sample(request, None)
    p, err = _call(request, "preview", key, today, sample)
    ahead, ahead_err = _call(request, "lookahead", key, today, LOOKAHEAD_DAYS, sample)
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
def blast(
    key: str,
    request: Request,
    user: AnyUser,
) -> Response:
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


@router.post("/rules/{key}/activation")
def request_activation(
    key: str,
    request: Request,
    form: CsrfForm,
    user: Editor,
) -> Response:
    svc, st = _svc(request), request.app.state
    rule = svc.get(key)
    if _is_live(rule):
        flash(request, f"{key} v{rule['version']} is already live.", "info")
        return redirect(request, f"/rules/{key}/launch")
    failed = [r for r in svc.run_examples(_rule_in(rule, enabled=False)) if not r["ok"]]
    if failed:
        flash(
            request,
            "Examples must pass before activation: " + ", ".join(r["name"] for r in failed),
            "error",
        )
        return redirect(request, f"/rules/{key}/launch")
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
            flash(request, "Cannot activate: " + str(exc), "error")
            return redirect(request, f"/rules/{key}/launch")
        req = st.activations.create(
            key, rule["version"], user["username"], high, note, status="auto-approved"
        )
        _audit(
            request,
            user,
            "activation.auto",
            key,
            request_id=req["id"],
            version=rule["version"],
            audience=high,
            threshold=threshold,
            **detail,
        )
        flash(
            request,
            f"{key} v{rule['version']} is live (blast radius {high} ≤ {threshold}: "
            f"no approval needed; {words}).",
        )
    else:
        req = st.activations.create(key, rule["version"], user["username"], high, note)
        _audit(
            request,
            user,
            "activation.request",
            key,
            request_id=req["id"],
            version=rule["version"],
            audience=high,
            threshold=threshold,
            note=note,
            audience_error=err,
            **detail,
        )
        why = (
            f"blast radius up to {high} users > {threshold}"
            if high is not None
            else f"blast radius unknown ({err})"
        )
        flash(
            request,
            f"Activation of {key} v{rule['version']} requested: {why} ({words}), "
            "so an approver (not you) must approve it.",
            "info",
        )
    return redirect(request, f"/rules/{key}/launch")


@router.post("/rules/{key}/activation/{rid}/approve")
def approve(
    key: str,
    rid: int,
    request: Request,
    form: CsrfForm,
    user: Approver,
) -> Response:
    svc, st = _svc(request), request.app.state
    req = st.activations.get(rid)
    if req["rule_key"] != key:
        raise NotFound(f"no activation request {rid} for {key!r}")
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
        flash(request, "Cannot activate: " + str(exc), "error")
        return redirect(request, f"/rules/{key}/launch")
    if svc.get(key)["version"] != req["version"]:  # saved again while we were approving
        svc.set_enabled(key, False)
        st.activations.decide(rid, "withdrawn", user["username"], expect="approved")
        raise HTTPException(409, f"{key} changed while approving: left paused")
    _audit(
        request,
        user,
        "activation.approve",
        key,
        request_id=rid,
        version=req["version"],
        requested_by=req["requested_by"],
        audience=req["audience"],
    )
    flash(request, f"Approved: {key} v{req['version']} is live.")
    return redirect(request, f"/rules/{key}/launch")


def _version_author(request: Request, key: str, version: int) -> str | None:
    for v in _svc(request).versions(key):
        if v["version"] == version:
            return v.get("author")
    return None


@router.post("/rules/{key}/activation/{rid}/decline")
def decline(
    key: str,
    rid: int,
    request: Request,
    form: CsrfForm,
    user: Editor,
) -> Response:
    """The requester withdraws their request; an approver rejects someone else's."""
    st = request.app.state
    req = st.activations.get(rid)
    if req["rule_key"] != key:
        raise NotFound(f"no activation request {rid} for {key!r}")
    if req["requested_by"] == user["username"]:
        status = "withdrawn"
    elif user["role"] in APPROVERS:
        status = "rejected"
    else:
        raise HTTPException(403, "only the requester or an approver can decline a request")
    if not st.activations.decide(rid, status, user["username"]):
        raise HTTPException(409, f"request {rid} is no longer pending")
    action = "activation.withdraw" if status == "withdrawn" else "activation.reject"
    _audit(
        request,
        user,
        action,
        key,
        request_id=rid,
        version=req["version"],
        note=str(form.get("note") or "")[:2000] or None,
    )
    flash(request, f"Request {rid} {status}.", "info")
    return redirect(request, f"/rules/{key}/launch")


@router.post("/rules/{key}/pause")
def pause(
    key: str,
    request: Request,
    form: CsrfForm,
    user: Approver,
) -> Response:
    svc = _svc(request)
    before = svc.get(key)
    svc.set_enabled(key, False)
    _audit(request, user, "rule.pause", key, version=before["version"], was=before["status"])
    flash(request, f"{key} is paused.", "info")
    return redirect(request, f"/rules/{key}/launch")


@router.get("/approvals")
def approvals(
    request: Request,
    user: AnyUser,
) -> Response:
    pending = request.app.state.activations.pending()
    date_dep = {}
    for p in pending:
        dep, _ = _call(request, "date_dependence", p["rule_key"], p["version"])
        date_dep[p["id"]] = dep
    return render(
        request, "approvals.html", pending=pending, date_dep=date_dep, date_note=DATE_NOTE
    )


# -- history and docs -------------------------------------------------------------
@router.get("/rules/{key}/history")
def history(
    key: str,
    request: Request,
    user: AnyUser,
) -> Response:
    svc, st = _svc(request), request.app.state
    rule = svc.get(key)
    return render(
        request,
        "rule_history.html",
        rule=rule,
        tab="history",
        versions=list(reversed(svc.versions(key))),
        requests=st.activations.history(key, limit=50),
        audit=st.audit.list(target=f"rule:{key}", limit=100),
    )


@router.get("/guide")
def guide(
    request: Request,
    user: AnyUser,
) -> Response:
    from markupsafe import Markup

    html = helpdocs.guide_html()
    return render(
        request,
        "guide.html",
        guide=Markup(html) if html else None,  # noqa: S704 - markdown-it output, raw HTML disabled
        helpers=helpdocs.helper_reference(),
    )
