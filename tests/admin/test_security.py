"""Admin UI security on the server side: sign-in, sessions, CSRF, roles, approval
rules, escaping. (The browser tests check that nothing hostile runs in Chromium.)"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import Mount

from api.admin.security import LoginThrottle, csrf_form
from api.admin.store import AccountStore, ActivationStore, AuditLog
from tests.admin.conftest import CSRF_RE, PASSWORDS, AdminClient, AdminEnv

SOURCE = (
    "def match(profile, ctx):\n"
    '    left = days_until(get(profile, "vehicle.registration_expires_on"), ctx)\n'
    "    return left is not None and 0 <= left <= 14\n"
)


def rule_form(
    key: str = "vr-soon", name: str = "Vehicle registration soon", **extra: Any
) -> dict[str, Any]:
    return {
        "key": key,
        "name": name,
        "priority": "100",
        "source": SOURCE,
        "banner_title": "Registration {{ profile.vehicle.plate }}",
        "banner_body": "",
        "banner_link": "",
        "email_subject": "",
        "email_text": "",
        "email_html": "",
        "ex_name": ["soon", "later"],
        "ex_as_of": ["2026-11-24", "2026-11-24"],
        "ex_expect": ["true", "false"],
        "ex_profile": [
            '{"vehicle": {"registration_expires_on": "2026-12-02"}}',
            '{"vehicle": {"registration_expires_on": "2027-12-02"}}',
        ],
    } | extra


LIMIT = LoginThrottle(lambda: 0.0).address_limit  # failures per address and window


def admin_app(env: AdminEnv) -> Any:
    """The admin sub-application mounted at /admin (its state holds the throttle)."""
    return next(r.app for r in env.app.routes if isinstance(r, Mount) and r.path == "/admin")


def flashes(html: str) -> list[str]:
    return re.findall(r'class="flash[^"]*"[^>]*>([^<]*)', html)


# -- sign-in and sessions -------------------------------------------------------------
def test_pages_need_sign_in(admin_env: AdminEnv) -> None:
    anon = admin_env.as_user(None)
    r = anon.client.get("/admin/rules/x/launch", follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == "/admin/login?next=/admin/rules/x/launch"
    assert anon.client.get("/admin/runs", headers={"X-Requested-With": "fetch"}).status_code == 401
    assert anon.client.get("/admin").url.path == "/admin/login"


def _login(client: Any, name: str, password: str, **extra: str) -> Any:
    token = CSRF_RE.search(client.get("/admin/login").text).group(1)
    return client.post(
        "/admin/login",
        data={"username": name, "password": password, "csrf_token": token, **extra},
        follow_redirects=False,
    )


def test_wrong_password_unknown_user_and_throttle(admin_env: AdminEnv) -> None:
    anon = admin_env.as_user(None)
    for name, pw in (("ana", "wrong-password"), ("nobody", "whatever-pass")):
        r = _login(anon.client, name, pw)
        assert r.status_code == 401 and "Wrong user name or password" in r.text
    for _ in range(LIMIT - 2):
        assert _login(anon.client, "ana", "nope").status_code == 401
    # This address has failed LIMIT times: it waits, even with the right password...
    r = _login(anon.client, "ana", PASSWORDS["ana"])
    assert r.status_code == 429 and "from your address" in r.text
    assert _login(anon.client, "pat", PASSWORDS["pat"]).status_code == 429
    # ...but the real user, from another address, is not locked out.
    real = TestClient(admin_env.app, client=("198.51.100.7", 40000))
    admin_env.clients.append(real)
    r = _login(real, "ana", PASSWORDS["ana"])
    assert r.status_code == 303 and r.headers["location"] == "/admin/"
    actions = [e["action"] for e in AuditLog(admin_env.container.control).list(target="user:ana")]
    assert actions.count("auth.failed") == LIMIT - 1 and "auth.throttled" in actions
    assert actions.count("auth.login") == 1


def test_a_flood_of_names_from_one_address_does_not_reset_the_throttle(
    admin_env: AdminEnv,
) -> None:
    throttle = admin_app(admin_env).state.throttle
    for i in range(LIMIT):
        assert throttle.attempt("192.0.2.1", f"name{i}") is None
    # The old throttle forgot everything after 10,000 names: this one keeps the
    # address blocked however many names follow.
    for i in range(12_000):
        throttle.attempt("192.0.2.1", f"spray{i}")
    wait = throttle.blocked_for("192.0.2.1", "ana")
    assert wait is not None and wait.reason == "address"
    assert len(throttle._addresses) <= throttle._addresses.cap
    assert len(throttle._accounts) <= throttle._accounts.cap


def test_session_cookie_flags_and_security_headers(admin_env: AdminEnv) -> None:
    anon = admin_env.as_user(None)
    r = anon.client.get("/admin/login")
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "path=/admin" in cookie
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-store"


def test_open_redirect_refused(admin_env: AdminEnv) -> None:
    anon = admin_env.as_user(None)
    token = CSRF_RE.search(anon.client.get("/admin/login").text).group(1)
    for nxt in ("//evil.example/", "https://evil.example/admin/", "/admin/\\\\evil.example"):
        r = anon.client.post(
            "/admin/login",
            follow_redirects=False,
            data={
                "username": "ana",
                "password": PASSWORDS["ana"],
                "csrf_token": token,
                "next": nxt,
            },
        )
        assert r.headers["location"] == "/admin/"
        token = CSRF_RE.search(anon.client.get("/admin/").text).group(1)


def test_disabled_account_and_new_password_end_sessions(admin_env: AdminEnv) -> None:
    ana = admin_env.as_user("ana")
    root = admin_env.as_user("root")
    assert (
        root.post(
            "/admin/users/ana", {"action": "password", "password": "a-new-password-1"}
        ).status_code
        == 200
    )
    assert ana.client.get("/admin/").url.path == "/admin/login"
    ana2 = admin_env.as_user(None)
    token = CSRF_RE.search(ana2.client.get("/admin/login").text).group(1)
    r = ana2.client.post(
        "/admin/login",
        data={"username": "ana", "password": "a-new-password-1", "csrf_token": token},
    )
    assert r.url.path == "/admin/"
    root.post("/admin/users/ana", {"action": "disable"})
    assert ana2.client.get("/admin/").url.path == "/admin/login"


# -- CSRF ---------------------------------------------------------------------------
def test_every_post_route_checks_csrf(admin_env: AdminEnv) -> None:
    """Introspection: no unsafe route without the CSRF dependency."""
    from api.admin.routes import auth, rules, runs, users

    unsafe = [
        r
        for m in (auth, rules, runs, users)
        for r in m.router.routes
        if isinstance(r, APIRoute) and r.methods - {"GET", "HEAD", "OPTIONS"}
    ]
    assert len(unsafe) >= 15
    for route in unsafe:
        deps = {d.call for d in route.dependant.dependencies}
        assert csrf_form in deps, f"{route.path} has no CSRF check"


POST_PATHS = [
    "/admin/rules",
    "/admin/rules/vr-soon",
    "/admin/api/validate",
    "/admin/api/render",
    "/admin/api/examples",
    "/admin/rules/vr-soon/test",
    "/admin/rules/vr-soon/preview",
    "/admin/rules/vr-soon/forecast",
    "/admin/rules/vr-soon/shadow",
    "/admin/rules/vr-soon/activation",
    "/admin/rules/vr-soon/activation/1/approve",
    "/admin/rules/vr-soon/activation/1/decline",
    "/admin/rules/vr-soon/pause",
    "/admin/runs",
    "/admin/users",
    "/admin/users/ana",
    "/admin/logout",
]


def test_posts_without_the_token_are_refused(admin_env: AdminEnv) -> None:
    root = admin_env.as_user("root")
    root.post("/admin/rules", rule_form())
    data = rule_form() | {"username": "mallory", "password": "x" * 12, "role": "admin"}
    for path in POST_PATHS:
        assert root.client.post(path, data=data).status_code == 403, path  # no token
        assert root.client.post(path, data=data | {"csrf_token": "forged"}).status_code == 403, path
        r = root.client.post(
            path, data=data | {"csrf_token": root.csrf}, headers={"Origin": "https://evil.example"}
        )
        assert r.status_code == 403, path  # right token, cross-site origin
    assert admin_env.container.rules.get("vr-soon")["version"] == 1
    assert admin_env.container.rules.get("vr-soon")["enabled"] is False
    assert root.client.get("/admin/runs").text.count('href="/admin/runs/') == 0
    assert AccountStore(admin_env.container.control).find("mallory") is None


def test_login_form_needs_csrf(admin_env: AdminEnv) -> None:
    anon = admin_env.as_user(None)
    r = anon.client.post("/admin/login", data={"username": "ana", "password": PASSWORDS["ana"]})
    assert r.status_code == 403


def test_csrf_header_works_for_scripts(admin_env: AdminEnv) -> None:
    ana = admin_env.as_user("ana")
    r = ana.client.post(
        "/admin/api/validate",
        data={"source": "def match(p, ctx):\n  return (\n"},
        headers={"X-CSRF-Token": ana.csrf, "X-Requested-With": "fetch"},
    )
    assert r.status_code == 200
    assert r.json()["problems"][0]["line"] == 2


# -- roles ----------------------------------------------------------------------------
def _request_activation(env: AdminEnv, who: str = "ana") -> tuple[AdminClient, int]:
    c = env.as_user(who)
    assert c.post("/admin/rules", rule_form()).status_code == 200
    r = c.post("/admin/rules/vr-soon/activation", {"note": "please"})
    assert "must approve" in " ".join(flashes(r.text)), flashes(r.text)
    (req,) = ActivationStore(env.container.control).pending("vr-soon")
    return c, int(req["id"])


def test_analyst_cannot_activate_by_crafted_posts(admin_env: AdminEnv) -> None:
    ana, rid = _request_activation(admin_env)
    rules = admin_env.container.rules
    for path in (
        f"/admin/rules/vr-soon/activation/{rid}/approve",
        "/admin/rules/vr-soon/pause",
        "/admin/runs",
        "/admin/users",
    ):
        r = ana.post(path, {"username": "x", "password": "y" * 12, "role": "admin"})
        assert r.status_code == 403, path
    # Asking again does not activate either: still above the threshold.
    ana.post("/admin/rules/vr-soon/activation", {})
    assert rules.get("vr-soon")["enabled"] is False
    assert ana.client.get("/admin/users").status_code == 403
    assert ana.client.get("/admin/audit").status_code == 403


def test_approver_cannot_approve_own_request_or_own_version(admin_env: AdminEnv) -> None:
    pat, rid = _request_activation(admin_env, who="pat")
    assert pat.post(f"/admin/rules/vr-soon/activation/{rid}/approve").status_code == 403
    # quinn approves pat's request: fine.
    quinn = admin_env.as_user("quinn")
    r = quinn.post(f"/admin/rules/vr-soon/activation/{rid}/approve")
    assert r.status_code == 200 and "is live" in " ".join(flashes(r.text))
    assert admin_env.container.rules.get("vr-soon")["enabled"] is True
    # A version quinn wrote, requested by ana, cannot be approved by quinn.
    form = rule_form(name="Vehicle registration soon (v2)")
    quinn.post("/admin/rules/vr-soon", form)
    assert admin_env.container.rules.get("vr-soon")["enabled"] is False  # saving pauses a live rule
    ana = admin_env.as_user("ana")
    ana.post("/admin/rules/vr-soon/activation")
    (pending,) = ActivationStore(admin_env.container.control).pending("vr-soon")
    r = quinn.post(f"/admin/rules/vr-soon/activation/{pending['id']}/approve")
    assert r.status_code == 403 and "you wrote version 2" in r.text
    assert pat.post(f"/admin/rules/vr-soon/activation/{pending['id']}/approve").status_code == 200
    assert admin_env.container.rules.get("vr-soon")["enabled"] is True


def test_saving_withdraws_a_pending_request(admin_env: AdminEnv) -> None:
    ana, rid = _request_activation(admin_env)
    ana.post("/admin/rules/vr-soon", rule_form(name="changed"))
    pat = admin_env.as_user("pat")
    r = pat.post(f"/admin/rules/vr-soon/activation/{rid}/approve")
    assert r.status_code == 409
    assert admin_env.container.rules.get("vr-soon")["enabled"] is False


def test_small_audience_activates_without_approver(admin_env: AdminEnv) -> None:
    admin_env.container.settings.admin_approval_audience = 1_000
    ana = admin_env.as_user("ana")
    ana.post("/admin/rules", rule_form())
    r = ana.post("/admin/rules/vr-soon/activation")
    assert "no approval needed" in " ".join(flashes(r.text))
    assert admin_env.container.rules.get("vr-soon")["enabled"] is True
    # ...but an analyst still cannot pause it (approvers do).
    assert ana.post("/admin/rules/vr-soon/pause").status_code == 403


def test_failing_examples_block_the_request(admin_env: AdminEnv) -> None:
    ana = admin_env.as_user("ana")
    form = rule_form(ex_expect=["false", "false"])
    r = ana.post("/admin/rules", form)
    assert "1 of 2 examples pass" in " ".join(flashes(r.text))
    r = ana.post("/admin/rules/vr-soon/activation")
    assert "Examples must pass" in " ".join(flashes(r.text))
    assert ActivationStore(admin_env.container.control).pending() == []


# -- escaping -------------------------------------------------------------------------
HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)>\"'&"


def test_hostile_strings_are_escaped_everywhere(admin_env: AdminEnv) -> None:
    ana = admin_env.as_user("ana")
    form = rule_form(
        name=HOSTILE,
        group="g",
        banner_title=HOSTILE + "{{ profile.name }}",
        email_subject=HOSTILE,
        email_text="{{ profile.name }}",
        email_html=HOSTILE + "{{ profile.name }}",
        ex_name=[HOSTILE, "later"],
    )
    r = ana.post("/admin/rules", form)
    assert r.status_code == 200
    pages = [r.text] + [
        ana.client.get(p).text
        for p in ("/admin/", "/admin/rules/vr-soon/launch", "/admin/rules/vr-soon/history")
    ]
    profile = json.dumps({"name": HOSTILE, "vehicle": {"registration_expires_on": "2026-12-01"}})
    pages.append(
        ana.post("/admin/rules/vr-soon/test", {"profile": profile, "as_of": "2026-11-24"}).text
    )
    pages.append(ana.post("/admin/api/render", form | {"preview_profile": profile}).text)
    pages.append(ana.post("/admin/api/examples", form).text)
    pages.append(ana.client.get("/admin/rules/vr-soon/diff?a=1&b=1").text)
    for html in pages:
        assert "<script>alert(1)" not in html
        assert "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in pages[0]
    # The e-mail HTML sits in a sandboxed iframe, as an escaped srcdoc attribute.
    test_html = pages[4]
    assert re.search(r'<iframe class="html" sandbox="" [^>]*srcdoc="&lt;script&gt;', test_html), (
        test_html
    )


def test_rule_key_in_urls_is_constrained(admin_env: AdminEnv) -> None:
    ana = admin_env.as_user("ana")
    r = ana.post("/admin/rules", rule_form(key='x"><script>'))
    assert r.status_code == 422 and "<script>" not in r.text.split("<main>")[1].split("</main>")[
        0
    ].replace("&lt;script&gt;", "")


# -- audit ----------------------------------------------------------------------------
def test_audit_log_records_who_what_when_and_the_diff(admin_env: AdminEnv) -> None:
    ana = admin_env.as_user("ana")
    ana.post("/admin/rules", rule_form())
    ana.post("/admin/rules/vr-soon", rule_form(source=SOURCE.replace("14", "21")))
    entries = AuditLog(admin_env.container.control).list(target="rule:vr-soon")
    save = next(e for e in entries if e["action"] == "rule.save")
    assert save["actor"] == "ana" and save["at"] is not None
    assert "-    return left is not None and 0 <= left <= 14" in save["detail"]["diff"]["source"]
    assert "+    return left is not None and 0 <= left <= 21" in save["detail"]["diff"]["source"]
    assert [e["action"] for e in entries][-1] == "rule.create"
    pat = admin_env.as_user("pat")
    page = pat.client.get("/admin/audit?target=rule:vr-soon").text
    assert "rule.save" in page and "0 &lt;= left &lt;= 21" in page
