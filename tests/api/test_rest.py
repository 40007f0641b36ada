"""REST contract on the embedded setup: auth, validation, rules, nothing written on bad input."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from base.clock import Clock
from engine.messages.event import parse_event
from kvadrupel.container import Container
from kvadrupel.settings import Settings

ADMIN, INGEST, PORTAL = "a" * 24, "i" * 24, "p" * 24
H = {role: {"Authorization": f"Bearer {tok}"} for role, tok in
     (("admin", ADMIN), ("ingest", INGEST), ("portal", PORTAL))}

RULE = {
    "key": "dl-soon",
    "name": "Licence expires soon",
    "priority": 100,
    "source": "def match(profile, ctx):\n"
    "    d = days_until(get(profile, 'driver_license.expires_on'), ctx)\n"
    "    return d is not None and 0 <= d <= 30\n",
    "banner": {
        "title": "Expires {{ profile.driver_license.expires_on }}",
        "body": "Renew it",
        "link": "/renew",
    },
    "email": {
        "subject": "Your licence",
        "text": "Hello {{ profile.name }}",
        "html": "<p>Hello {{ profile.name }}</p>",
    },
    "examples": [
        {
            "name": "soon",
            "profile": {"driver_license": {"expires_on": "2026-12-01"}},
            "as_of": "2026-11-24",
            "expect": True,
        },
        {
            "name": "later",
            "profile": {"driver_license": {"expires_on": "2027-12-01"}},
            "as_of": "2026-11-24",
            "expect": False,
        },
    ],
}


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[TestClient, Container]]:
    settings = Settings(
        data_dir=tmp_path, admin_token=ADMIN, ingest_token=INGEST, portal_token=PORTAL
    )
    c = Container(settings, clock=Clock.pinned(date(2026, 11, 24), settings.timezone))
    c.migrate()
    with TestClient(create_app(c)) as client:
        yield client, c
    c.close()


def events_queued(c: Container) -> int:
    return len(c.bus.messages(c.bus.topic("events")))  # type: ignore[attr-defined]


def test_healthz_needs_no_token(api: tuple[TestClient, Container]) -> None:
    client, _ = api
    assert client.get("/healthz").json() == {"status": "ok"}


@pytest.mark.parametrize("method,path,role", [
    ("GET", "/v1/rules", "admin"), ("POST", "/v1/runs", "admin"),
    ("POST", "/v1/events", "ingest"), ("GET", "/v1/users/5/banners", "portal"),
])
def test_endpoints_require_their_token(api: tuple[TestClient, Container], method: str, path: str,
                                       role: str) -> None:
    client, _ = api
    assert client.request(method, path).status_code == 401
    assert (
        client.request(method, path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    )
    other = "portal" if role != "portal" else "ingest"
    r = client.request(method, path, headers=H[other])
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(
    "body,reason",
    [
        (b"{oops", "malformed JSON"),
        (b'{"event_id": "e", "user_id": 1, "set": {"a": 1}, "extra": 1}', "extra"),
        (b'{"event_id": "e", "user_id": "abc", "set": {"a": 1}}', "user_id"),
        (b'{"event_id": "e", "user_id": -4, "set": {"a": 1}}', "user_id"),
        (b'{"event_id": "e", "user_id": 18446744073709551616, "set": {"a": 1}}', "user_id"),
        (b'{"event_id": "e", "user_id": 1, "inc": {"n": "many"}}', "number"),
        (
            b'[{"event_id": "ok", "user_id": 1, "set": {"a": 1}}, '
            b'{"event_id": "bad", "user_id": 0, "set": {}}]',
            "event 1",
        ),
        (b"[]", "no events"),
    ],
)
def test_bad_events_get_422_and_nothing_is_queued(api: tuple[TestClient, Container], body: bytes,
                                                  reason: str) -> None:
    client, c = api
    r = client.post(
        "/v1/events", content=body, headers=H["ingest"] | {"content-type": "application/json"}
    )
    assert r.status_code == 422, r.text
    assert reason in r.json()["detail"]
    assert events_queued(c) == 0


def test_good_events_are_queued_keyed_by_user(api: tuple[TestClient, Container]) -> None:
    client, c = api
    r = client.post("/v1/events", headers=H["ingest"], json={"events": [
        {"event_id": "1", "user_id": "77", "set": {"a": 1}},
        {"event_id": "2", "user_id": 78, "inc": {"n": 1}}]})
    assert r.status_code == 202 and r.json() == {"accepted": 2}
    msgs = c.bus.messages(c.bus.topic("events"))  # type: ignore[attr-defined]
    assert sorted(m.key for m in msgs) == [b"77", b"78"]
    assert parse_event(next(m.value for m in msgs if m.key == b"77")).user_id == 77


def test_rule_lifecycle(api: tuple[TestClient, Container]) -> None:
    client, _ = api
    r = client.post("/v1/rules", json=RULE, headers=H["admin"])
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 1 and r.json()["status"] == "active"
    assert client.post("/v1/rules", json=RULE, headers=H["admin"]).status_code == 409
    # what it can read of a profile (its read-set: rules/readset.py)
    assert client.get("/v1/rules/dl-soon", headers=H["admin"]).json()["reads"] == [
        "driver_license.expires_on"]

    changed = RULE | {"name": "Renamed", "priority": 7}
    changed.pop("key")
    r = client.put("/v1/rules/dl-soon", json=changed, headers=H["admin"])
    assert r.status_code == 200 and r.json()["version"] == 2 and r.json()["name"] == "Renamed"
    versions = client.get("/v1/rules/dl-soon/versions", headers=H["admin"]).json()["versions"]
    assert [v["version"] for v in versions] == [1, 2] and versions[0]["name"] == RULE["name"]

    r = client.post(
        "/v1/rules/dl-soon/test",
        headers=H["admin"],
        json={
            "profile": {"name": "<b>Ann</b>", "driver_license": {"expires_on": "2026-12-10"}},
            "as_of": "2026-11-24",
        },
    )
    assert r.status_code == 200
    body = r.json()
    assert body["match"] is True
    assert body["banner"]["title"] == "Expires 2026-12-10"
    assert body["email"]["html"] == "<p>Hello &lt;b&gt;Ann&lt;/b&gt;</p>"
    assert client.post("/v1/rules/dl-soon/test", headers=H["admin"], json={
        "profile": {}, "as_of": "2026-11-24"}).json()["match"] is False
    assert client.get("/v1/rules/nope", headers=H["admin"]).status_code == 404


def test_rule_with_syntax_error_is_refused_with_the_line(api: tuple[TestClient, Container]) -> None:
    client, _ = api
    bad = RULE | {"source": "def match(profile, ctx):\n    x = 1\n    return x ==\n"}
    r = client.post("/v1/rules", json=bad, headers=H["admin"])
    assert r.status_code == 422
    assert r.json()["errors"][0]["line"] == 3


def test_rule_breaking_the_sandbox_is_refused(api: tuple[TestClient, Container]) -> None:
    client, _ = api
    bad = RULE | {"source": "import os\ndef match(profile, ctx):\n    return True\n"}
    r = client.post("/v1/rules", json=bad, headers=H["admin"])
    assert r.status_code == 422 and r.json()["errors"][0]["line"] == 1


def test_rule_with_failing_example_cannot_be_enabled(api: tuple[TestClient, Container]) -> None:
    client, _ = api
    wrong = RULE | {"examples": [RULE["examples"][0] | {"expect": False}]}
    r = client.post("/v1/rules", json=wrong, headers=H["admin"])
    assert r.status_code == 422 and "soon" in r.json()["detail"]
    r = client.post("/v1/rules", json=wrong | {"enabled": False}, headers=H["admin"])
    assert r.status_code == 201 and r.json()["status"] == "paused"
    assert client.post("/v1/rules/dl-soon/enable", headers=H["admin"]).status_code == 422


@pytest.mark.parametrize("uid", ["0", "-1", "abc", "9223372036854775808", "01"])
def test_banner_endpoint_refuses_bad_user_ids(api: tuple[TestClient, Container], uid: str) -> None:
    client, _ = api
    assert client.get(f"/v1/users/{uid}/banners", headers=H["portal"]).status_code == 422


def test_banners_of_unknown_user_are_empty_with_etag(api: tuple[TestClient, Container]) -> None:
    client, _ = api
    r = client.get("/v1/users/5/banners", headers=H["portal"])
    assert r.status_code == 200 and r.json() == {"banners": []}
    r2 = client.get(
        "/v1/users/5/banners", headers=H["portal"] | {"If-None-Match": r.headers["etag"]}
    )
    assert r2.status_code == 304


# -- hostile input: 4xx with a reason, never a 500 ------------------------------------------
def _nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


@pytest.mark.parametrize("depth", [255, 260, 1000])
def test_deeply_nested_event_is_a_422_with_a_reason(api: tuple[TestClient, Container],
                                                    depth: int) -> None:
    client, c = api
    body = b'{"event_id": "e", "user_id": 5, "set": {"x": ' + _nested(depth) + b"}}"
    r = client.post("/v1/events", content=body,
                    headers=H["ingest"] | {"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert "nested" in r.json()["detail"] or "depth" in r.json()["detail"]
    for wrapped in (b'{"events": [' + body + b"]}", b'{"event_id": "e", "user_id": 5, '
                    b'"set": {"a": 1}, "zz": ' + _nested(depth) + b"}"):
        r = client.post("/v1/events", content=wrapped, headers=H["ingest"])
        assert r.status_code == 422, r.text
    assert events_queued(c) == 0


def test_a_failing_template_in_a_rule_test_is_a_422(api: tuple[TestClient, Container]) -> None:
    client, _ = api
    rule = RULE | {"key": "div", "banner": RULE["banner"] | {"title": "{{ 1 // profile.n }}"}}
    assert client.post("/v1/rules", json=rule, headers=H["admin"]).status_code == 201
    r = client.post("/v1/rules/div/test", headers=H["admin"],
                    json={"profile": {"n": 0}, "as_of": "2026-11-24"})
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert "title" in r.json()["detail"] and "ZeroDivisionError" in r.json()["detail"]
    ok = client.post("/v1/rules/div/test", headers=H["admin"],
                     json={"profile": {"n": 1}, "as_of": "2026-11-24"})
    assert ok.status_code == 200 and ok.json()["banner"]["title"] == "1"


# -- banner links ----------------------------------------------------------------------------
BAD_LINKS = ["javascript:alert(1)", "JavaScript:alert(1)", " \tjava\nscript:alert(1)",
             "data:text/html,<script>alert(1)</script>", "vbscript:x", "file:///etc/passwd",
             "javascript:{{ profile.x }}", "myapp://renew"]
GOOD_LINKS = ["", "/renew", "renew?x=1", "#top", "https://x.test/renew", "http://x.test/",
              "//x.test/renew", "https://x.test/{{ profile.id }}", "/u/{{ profile.id }}",
              "{{ profile.deeplink }}"]


@pytest.mark.parametrize("link", BAD_LINKS)
def test_banner_link_with_a_foreign_scheme_is_refused(api: tuple[TestClient, Container],
                                                      link: str) -> None:
    client, c = api
    for banner in ({"link": link}, {"translations": {"en": {"link": link}}},
                   {"push": {"link": link}}):
        rule = RULE | {"banner": RULE["banner"] | banner}
        r = client.post("/v1/rules", json=rule, headers=H["admin"])
        assert r.status_code == 422, (banner, r.text)
        assert "link scheme" in r.json()["detail"] and "not allowed" in r.json()["detail"]
    assert c.rules.list() == []
    # A new version is checked too.
    assert client.post("/v1/rules", json=RULE, headers=H["admin"]).status_code == 201
    changed = RULE | {"banner": RULE["banner"] | {"link": link}}
    changed.pop("key")
    assert client.put("/v1/rules/dl-soon", json=changed, headers=H["admin"]).status_code == 422


@pytest.mark.parametrize("link", GOOD_LINKS)
def test_relative_and_web_links_are_accepted(api: tuple[TestClient, Container], link: str) -> None:
    client, _ = api
    rule = RULE | {"banner": RULE["banner"] | {"link": link}}
    r = client.post("/v1/rules", json=rule, headers=H["admin"])
    assert r.status_code == 201, r.text


def test_the_apps_own_scheme_can_be_allowed(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import rules.models

    monkeypatch.setattr(rules.models, "_link_schemes", None)  # restored afterwards
    settings = Settings(data_dir=tmp_path, admin_token=ADMIN,
                        banner_link_schemes="https, http, MyApp")  # type: ignore[arg-type]
    c = Container(settings, clock=Clock.pinned(date(2026, 11, 24), settings.timezone))
    c.migrate()
    try:
        with TestClient(create_app(c)) as client:
            ok = RULE | {"banner": RULE["banner"] | {"link": "myapp://renew"}}
            assert client.post("/v1/rules", json=ok, headers=H["admin"]).status_code == 201
            bad = RULE | {"key": "js", "banner": RULE["banner"] | {"link": "javascript:x"}}
            r = client.post("/v1/rules", json=bad, headers=H["admin"])
            assert r.status_code == 422 and "myapp" in r.json()["detail"]
    finally:
        c.close()


def test_jinja2_pin_excludes_versions_with_known_sandbox_escapes() -> None:
    """Rule templates run in Jinja2's sandbox: 3.1.5 and 3.1.6 fixed escapes from it
    (CVE-2024-56326, CVE-2025-27516), so older versions must not be installable."""
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    (req,) = [Requirement(d) for d in pyproject["project"]["dependencies"]
              if Requirement(d).name.lower() == "jinja2"]
    for old in ("3.1.0", "3.1.4", "3.1.5"):
        assert not req.specifier.contains(old), (str(req), old)
    assert req.specifier.contains("3.1.6")
    assert req.specifier.contains(version("jinja2"))  # and what is installed is one of them
