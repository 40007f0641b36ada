"""The rule editor: a new rule, saving a version, live validation, the examples and
the templates rendered for a profile, while editing."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import FormData

from api.admin import helpdocs
from api.admin.forms import editor_values, rule_from_form
from api.admin.pages import flash, redirect, render
from api.admin.routes.rules.common import (
    audit,
    call_optional,
    form_date,
    is_live,
    load_profile,
    router,
    rule_in,
    rule_service,
    today,
)
from api.admin.security import AnyUser, CsrfForm, Editor
from base.errors import Conflict, KvadrupelError, RuleValidationError
from rules.models import KEY_RE, RuleIn

# Parts of a rule's banner/e-mail an older form (without ``content_fields``) did not
# post: a save from such a form keeps them from the current version instead of dropping
# them. The editor's form edits them all (and the variants), so its save is the content.
_UNEDITED = {
    "banner": ("translations", "expires_at", "push", "category", "importance"),
    "email": ("translations", "category", "importance"),
}


def _keep_unedited(rule: RuleIn, before: dict[str, Any], full: bool) -> RuleIn:
    data = rule.model_dump(mode="json", exclude_unset=True)
    changed = False
    # The holdout and its salt (set through the REST API) carry over too.
    for f in ("holdout", "salt"):
        if f not in data and before.get(f):
            data[f] = before[f]
            changed = True
    if not full and before.get("variants") and "variants" not in data:
        data["variants"] = before["variants"]
        changed = True
    for part, fields in _UNEDITED.items() if not full else ():
        old, new = before.get(part), data.get(part)
        if not old or not new:
            continue
        for f in fields:
            if old.get(f) is not None and f not in new:
                new[f] = old[f]
                changed = True
    return RuleIn.model_validate(data) if changed else rule


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
        today=today(request),
        tab="edit",
        pending=pending,
        live=bool(rule and is_live(rule)),
    )


def _flash_saved(request: Request, saved: dict[str, Any], results: list[dict[str, Any]]) -> None:
    ok = sum(r["ok"] for r in results)
    text = f"Saved {saved['key']} as version {saved['version']}"
    if results:
        text += f": {ok} of {len(results)} examples pass"
    flash(request, text, "ok" if ok == len(results) else "warn")


@router.get("/new")
def new_rule(request: Request, user: Editor) -> Response:
    return _editor(request, rule=None, values=editor_values(None))


@router.post("/rules")
def create_rule(request: Request, form: CsrfForm, user: Editor) -> Response:
    svc = rule_service(request)
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
    audit(
        request,
        user,
        "rule.create",
        rule.key,
        version=saved["version"],
        rule=rule.model_dump(mode="json", exclude={"enabled"}),
    )
    _flash_saved(request, saved, results)
    return redirect(request, f"/rules/{rule.key}")


@router.get("/rules/{key}")
def edit_rule(key: str, request: Request, user: AnyUser) -> Response:
    svc = rule_service(request)
    rule = svc.get(key)
    results = svc.run_examples(rule_in(rule, enabled=False))
    return _editor(request, rule=rule, values=editor_values(rule), results=results)


@router.post("/rules/{key}")
def save_rule(key: str, request: Request, form: CsrfForm, user: Editor) -> Response:
    svc = rule_service(request)
    before = svc.get(key)
    values, rule, problems = rule_from_form(form, key=key)
    if rule is not None:
        rule = _keep_unedited(rule, before, bool(form.get("content_fields")))
        problems = svc.validate(rule)
    if rule is None or problems:
        return _editor(request, 422, rule=before, values=values, problems=problems)
    unchanged = rule_in(before, enabled=False).model_dump(mode="json") == rule.model_dump(
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
    diff, _ = call_optional(request, "diff", key, before["version"], saved["version"])
    audit(
        request,
        user,
        "rule.save",
        key,
        version=saved["version"],
        previous=before["version"],
        was_live=is_live(before),
        diff=diff,
    )
    # A pending request was for the old version: it no longer applies.
    for p in request.app.state.activations.pending(key):
        request.app.state.activations.decide(p["id"], "withdrawn", user["username"])
    _flash_saved(request, saved, results)
    if is_live(before):
        flash(request, "The rule was live: it is paused until this version is activated.", "warn")
    return redirect(request, f"/rules/{key}")


@router.post("/api/validate")
def validate(request: Request, form: CsrfForm, user: Editor) -> JSONResponse:
    """Live validation for the editor: sandbox and template problems with their lines."""
    key = str(form.get("key") or "").strip()
    _, rule, problems = rule_from_form(_with_key(form, key if KEY_RE.match(key) else "draft"))
    problems = [p for p in problems if not str(p["field"]).startswith("examples")]
    if rule is not None:
        problems = rule_service(request).validate(rule)
    return JSONResponse({"ok": not problems, "problems": problems})


@router.post("/api/examples")
def run_examples(request: Request, form: CsrfForm, user: Editor) -> Response:
    """Run the examples in the editor (unsaved) through RuleService.run_examples."""
    _, rule, problems = rule_from_form(_with_key(form, "draft"))
    results = None
    if rule is not None:
        problems = rule_service(request).validate(rule)
        if not problems:
            results = rule_service(request).run_examples(rule)
    return render(request, "_examples.html", results=results, problems=problems)


@router.post("/api/render")
def render_templates(request: Request, form: CsrfForm, user: Editor) -> Response:
    """The banner/e-mail templates in the editor rendered for a chosen profile."""
    values, _, _ = rule_from_form(_with_key(form, "draft"))
    profile, label, err = load_profile(
        request, str(form.get("preview_user") or ""), str(form.get("preview_profile") or "")
    )
    as_of = form_date(form.get("preview_as_of"), today(request))
    out: dict[str, Any] = {"label": label, "error": err, "as_of": as_of}
    if profile is not None:
        # Templates are analyst code: rendered in a sandbox child, never here.
        try:
            out |= rule_service(request).runner.render(
                {"banner": values["banner"], "email": values["email"]}, profile, as_of,
                request.app.state.settings.timezone)
        except KvadrupelError as exc:
            out["banner_error"] = str(exc)
    return render(request, "_rendered.html", r=out)
