"""A rule's history (versions, activation requests, audit trail) and the guide."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response
from markupsafe import Markup

from api.admin import helpdocs
from api.admin.pages import render
from api.admin.routes.rules.common import router, rule_service
from api.admin.security import AnyUser


@router.get("/rules/{key}/history")
def history(key: str, request: Request, user: AnyUser) -> Response:
    svc, st = rule_service(request), request.app.state
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
def guide(request: Request, user: AnyUser) -> Response:
    html = helpdocs.guide_html()
    return render(
        request,
        "guide.html",
        guide=Markup(html) if html else None,  # noqa: S704 - markdown-it output, raw HTML disabled
        helpers=helpdocs.helper_reference(),
    )
