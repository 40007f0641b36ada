"""Admin UI security on the server side: sign-in, sessions, CSRF, roles, approval
rules, escaping. (The browser tests check that nothing hostile runs in Chromium.)"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import Mount

from api.admin.security import ClientAddress, LoginThrottle, csrf_form
from api.admin.store import AccountStore, ActivationStore, AuditLog
from api.app import create_app
from tests.admin.conftest import (
    CSRF_RE,
    PASSWORDS,
    AdminClient,
    AdminEnv,
    make_container,
    settings_for,
)

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


class FakeClock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def test_throttle_address_limit_ends_with_the_window() -> None:
    clock = FakeClock()
    t = LoginThrottle(clock, window=900, address_limit=3)
    for _ in range(3):
        assert t.attempt("192.0.2.1", "ana") is None
    wait = t.attempt("192.0.2.1", "ana")
    assert wait is not None and wait.reason == "address" and wait.seconds == 900
    assert t.attempt("192.0.2.2", "ana") is None  # another address: not affected
    clock.t += 899
    assert t.blocked_for("192.0.2.1", "bob") is not None
    clock.t += 1
    assert t.attempt("192.0.2.1", "ana") is None


def test_throttle_success_is_not_a_failure() -> None:
    t = LoginThrottle(FakeClock(), address_limit=2)
    for _ in range(5):
        assert t.attempt("192.0.2.1", "ana") is None
        t.succeeded("192.0.2.1", "ana")
    assert t.attempt("192.0.2.1", "ana") is None
    assert t.attempt("192.0.2.1", "ana") is None
    assert t.attempt("192.0.2.1", "ana") is not None


def test_throttle_slows_an_account_only_for_many_addresses() -> None:
    clock = FakeClock()
    t = LoginThrottle(clock, address_limit=20, account_addresses=3, account_delay_s=2,
                      account_delay_max_s=8)
    # One address hammering one name: its own limit stops it, the name is not slowed.
    for _ in range(20):
        t.attempt("203.0.113.66", "ana")
    assert t.attempt("203.0.113.66", "ana").reason == "address"
    assert t.blocked_for("198.51.100.7", "ana") is None
    # Failures from 3 distinct addresses: every address waits 2 s after the last.
    t.attempt("203.0.113.1", "ana")
    t.attempt("203.0.113.2", "ana")
    wait = t.blocked_for("198.51.100.7", "ana")
    assert wait is not None and wait.reason == "account" and wait.seconds == 2
    assert t.blocked_for("198.51.100.7", "bob") is None  # other names are not slowed
    clock.t += 2
    assert t.attempt("203.0.113.3", "ana") is None  # a 4th address: 4 s from now
    clock.t += 3.5
    assert t.blocked_for("198.51.100.7", "ana").seconds == 0.5
    clock.t += 0.5
    for i in range(4, 10):  # many more addresses: the delay stops at the maximum
        assert t.attempt(f"203.0.113.{i}", "ana") is None
        clock.t += 8
    assert t.blocked_for("198.51.100.7", "ana") is None
    t.attempt("203.0.113.99", "ana")
    assert t.blocked_for("198.51.100.7", "ana").seconds == 8


def test_an_address_that_signed_in_before_is_not_slowed_down() -> None:
    clock = FakeClock()
    t = LoginThrottle(clock, account_addresses=2, account_delay_s=30)
    assert t.attempt("198.51.100.7", "ana") is None
    t.succeeded("198.51.100.7", "ana")  # the real user, last week
    clock.t += 7 * 86400
    t.attempt("203.0.113.1", "ana")
    t.attempt("203.0.113.2", "ana")
    assert t.blocked_for("203.0.113.3", "ana").reason == "account"
    assert t.attempt("198.51.100.7", "ana") is None


def test_throttle_memory_is_bounded_without_forgetting_everything() -> None:
    t = LoginThrottle(FakeClock(), address_limit=2, max_entries=100)
    for i in range(500):  # fresh addresses and names
        assert t.attempt(f"10.0.{i // 250}.{i % 250}", f"n{i}") is None
        assert len(t._addresses) <= 100 and len(t._accounts) <= 100
    # The least recently used entries went, one by one; a busy address stays.
    t2 = LoginThrottle(FakeClock(), address_limit=1000, max_entries=100)
    for i in range(500):
        t2.attempt("192.0.2.1", f"n{i}")
        t2.attempt(f"10.1.{i // 250}.{i % 250}", f"m{i}")
    assert "192.0.2.1" in t2._addresses and len(t2._addresses) == 100


def test_client_address_trusts_forwarded_for_only_from_trusted_proxies() -> None:
    from starlette.requests import Request

    def req(peer: str, xff: str | None = None) -> Request:
        headers = [(b"x-forwarded-for", xff.encode())] if xff is not None else []
        return Request({"type": "http", "client": (peer, 1), "headers": headers})

    plain = ClientAddress([])
    assert plain(req("192.0.2.9", "198.51.100.1")) == "192.0.2.9"  # not trusted: ignored
    proxied = ClientAddress(["10.0.0.0/8", "127.0.0.1"])
    assert proxied(req("10.1.2.3", "198.51.100.1")) == "198.51.100.1"
    # A client cannot choose its address by sending X-Forwarded-For itself: the
    # right-most untrusted hop is the one the proxy saw.
    assert proxied(req("10.1.2.3", "1.2.3.4, 198.51.100.1, 10.9.9.9")) == "198.51.100.1"
    assert proxied(req("10.1.2.3", "garbage")) == "10.1.2.3"
    assert proxied(req("192.0.2.9", "198.51.100.1")) == "192.0.2.9"
    # IPv6 counts per /64; IPv4-mapped addresses as IPv4.
    assert plain(req("2001:db8:1:2:3:4:5:6")) == "2001:db8:1:2::/64"
    assert plain(req("::ffff:192.0.2.5")) == "192.0.2.5"


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


def test_a_copied_cookie_is_refused_after_sign_out(admin_env: AdminEnv) -> None:
    ana = admin_env.as_user("ana")
    stolen = ana.client.cookies.get("kvadrupel_admin", path="/admin")
    assert stolen
    replay = TestClient(admin_env.app, cookies={"kvadrupel_admin": stolen})
    admin_env.clients.append(replay)
    assert replay.get("/admin/").url.path == "/admin/"  # the copy works while signed in
    r = ana.post("/admin/logout")
    assert r.url.path == "/admin/login"
    # The copy still carries a valid signature, but the account's session generation
    # moved on: the server refuses it.
    replay = TestClient(admin_env.app, cookies={"kvadrupel_admin": stolen})
    admin_env.clients.append(replay)
    assert replay.get("/admin/").url.path == "/admin/login"
    assert replay.get("/admin/runs", headers={"X-Requested-With": "fetch"}).status_code == 401
    # Signing in again works (a fresh cookie with the new generation).
    assert admin_env.as_user("ana").client.get("/admin/").url.path == "/admin/"


def test_a_role_change_ends_sessions(admin_env: AdminEnv) -> None:
    pat = admin_env.as_user("pat")
    root = admin_env.as_user("root")
    assert root.post("/admin/users/root", {"action": "role", "role": "admin"}).status_code == 200
    assert root.client.get("/admin/users").url.path == "/admin/users"  # same role: no change
    assert root.post("/admin/users/pat", {"action": "role", "role": "analyst"}).status_code == 200
    assert pat.client.get("/admin/").url.path == "/admin/login"
    assert AccountStore(admin_env.container.control).get("pat")["role"] == "analyst"


@pytest.mark.parametrize(
    "overrides,secure",
    [
        ({}, False),
        ({"admin_cookie_secure": True}, True),
        ({"public_url": "https://kvadrupel.example"}, True),
        ({"public_url": "HTTPS://kvadrupel.example/base"}, True),
        ({"public_url": "http://kvadrupel.example"}, False),
    ],
)
def test_cookie_is_secure_behind_https(
    tmp_path: Path, overrides: dict[str, Any], secure: bool
) -> None:
    c = make_container(settings_for(tmp_path / "data", **overrides))
    try:
        with TestClient(create_app(c)) as client:
            cookie = client.get("/admin/login").headers["set-cookie"].lower()
    finally:
        c.close()
    assert "httponly" in cookie
    assert ("; secure" in cookie) is secure, cookie


@pytest.mark.parametrize(
    "nxt",
    [
        "/admin/rules\r\nSet-Cookie: evil=1",
        "/admin/\nx",
        "/admin/%0d%0aSet-Cookie:%20evil=1",
        "/admin/../v1/rules",
        "/admin/%2e%2e/v1/rules",
        "/admin/rules/\x00",
        "/admin/r\u00e9gle",
        "/adminx/",
        "/v1/rules",
        "/admin/login?next=//evil.example",
        "javascript:alert(1)",
    ],
)
def test_next_is_sanitised(admin_env: AdminEnv, nxt: str) -> None:
    anon = admin_env.as_user(None)
    r = _login(anon.client, "ana", PASSWORDS["ana"], next=nxt)
    assert r.status_code == 303 and r.headers["location"] == "/admin/"
    page = anon.client.get("/admin/login", params={"next": nxt})
    assert page.status_code == 200 and 'name="next" value="/admin/"' in page.text


def test_next_keeps_admin_paths(admin_env: AdminEnv) -> None:
    anon = admin_env.as_user(None)
    nxt = "/admin/rules/vr-soon/launch?tab=forecast&x=1"
    r = _login(anon.client, "ana", PASSWORDS["ana"], next=nxt)
    assert r.status_code == 303 and r.headers["location"] == nxt
    # The redirect to the sign-in page carries the path, quoted.
    r = admin_env.as_user(None).client.get("/admin/rules/a%20b/launch", follow_redirects=False)
    assert r.headers["location"] == "/admin/login?next=/admin/rules/a%20b/launch"


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
