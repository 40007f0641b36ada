"""The channels end to end, embedded pipeline + real SMTP + a loopback FCM: localised
banners, e-mail and push; "why do I see this"; the unsubscribe link; preferences;
impressions and clicks; delivery figures per rule."""

from __future__ import annotations

import html
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any
from urllib.parse import urljoin, urlsplit

import jwt
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from base.clock import Clock
from channels.pushers.fcm import FcmPusher
from kvadrupel.container import Container
from rules.models import RuleIn
from shards.schema import banner_stats
from tests.channels.deliverykit import TOKENS, embedded_settings
from tests.channels.push_receiver import PushReceiver
from tests.fixtures.waiting import wait_for

AS_OF = date(2026, 11, 24)
JWT_SECRET = "s" * 40
EN, RU, PT = 4_500_000_001, 4_500_000_002, 4_500_000_003

SOURCE = '''
def match(profile, ctx):
    left = days_until(get(profile, "driver_license.expires_on"), ctx)
    return left is not None and 0 <= left <= 30
'''
RULE = {
    "key": "dl-soon",
    "name": "Licence expires soon",
    "source": SOURCE,
    "priority": 100,
    "banner": {
        "title": "Права истекают {{ profile.driver_license.expires_on }}",
        "body": "Продлите их",
        "link": "https://x.test/renew",
        "translations": {
            "en": {
                "title": "Your licence expires on {{ profile.driver_license.expires_on }}",
                "body": "Renew it",
            }
        },
        "push": {"body": "{{ profile.name }}, renew it"},
        "category": "documents",
        "expires_at": "{{ profile.driver_license.expires_on }}",
    },
    "email": {
        "subject": "Права истекают",
        "text": "Здравствуйте, {{ profile.name }}!",
        "html": "<html><body><p>Здравствуйте, {{ profile.name }}</p></body></html>",
        "translations": {
            "en": {
                "subject": "Your licence expires",
                "text": "Hello {{ profile.name }}!",
                "html": "<p>Hello <b>{{ profile.name }}</b></p>",
            }
        },
        "category": "documents",
    },
}


@dataclass
class Stack:
    container: Container
    client: TestClient
    smtp: Any
    receiver: PushReceiver

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKENS[role + '_token']}"}

    def user_auth(self, uid: int) -> dict[str, str]:
        token = jwt.encode({"sub": str(uid), "exp": int(time.time()) + 600}, JWT_SECRET, "HS256")
        return {"Authorization": f"Bearer {token}"}

    def post(self, *events: dict[str, Any]) -> None:
        r = self.client.post("/v1/events", json=list(events), headers=self.auth("ingest"))
        assert r.status_code == 202, r.text

    def banners(self, uid: int) -> list[dict[str, Any]]:
        r = self.client.get(f"/v1/users/{uid}/banners", headers=self.auth("portal"))
        assert r.status_code == 200, r.text
        return r.json()["banners"]

    def mails_to(self, uid: int) -> list[Any]:
        return [m.message for m in self.smtp.messages if m.rcpt_tos == (f"u{uid}@example.org",)]


def _profile(uid: int, lang: str, name: str, days: int = 10, **extra: Any) -> dict[str, Any]:
    return {"event_id": f"p-{uid}-{days}", "user_id": uid,
            "set": {"name": name, "email": f"u{uid}@example.org", "language": lang,
                    "driver_license": {"expires_on": (AS_OF + timedelta(days=days)).isoformat()},
                    **extra}}


@pytest.fixture
def stack(tmp_path: Any, smtp_server: Any) -> Iterator[Stack]:
    receiver = PushReceiver()
    settings = embedded_settings(tmp_path, smtp_url=smtp_server.url, jwt_secret=JWT_SECRET,
                                 public_url="https://kvadrupel.example")
    container = Container(settings, clock=Clock.pinned(AS_OF, settings.timezone))
    container.migrate()
    container.rules.create(RuleIn.model_validate(RULE))
    stop = threading.Event()
    pusher = FcmPusher(receiver.account, endpoint=receiver.url)
    threads = [container.ingest_worker().start_thread(stop),
               container.evaluator_worker().start_thread(stop),
               container.delivery_worker(pusher=pusher).start_thread(stop)]
    client = TestClient(create_app(container))
    try:
        yield Stack(container, client, smtp_server, receiver)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        client.close()
        container.close()
        receiver.stop()


def test_localised_channels_and_why(stack: Stack) -> None:
    s = stack
    s.post(_profile(EN, "en-GB", "Ann", devices={"phone": {"push_token": "tok-ann"}}),
           _profile(RU, "ru", "Иван"), _profile(PT, "pt-BR", "João"))
    wait_for(lambda: {u: [b["id"] for b in s.banners(u)] for u in (EN, RU, PT)},
             "three banners (banners per user)", until=lambda got: all(got.values()),
             timeout=8, every=0.02)
    expires = (AS_OF + timedelta(days=10)).isoformat()
    assert s.banners(EN)[0]["title"] == f"Your licence expires on {expires}"  # en-GB → en
    assert s.banners(EN)[0]["body"] == "Renew it"
    assert s.banners(RU)[0]["title"] == f"Права истекают {expires}"  # the spec's own texts
    assert s.banners(PT)[0]["title"] == f"Права истекают {expires}"  # no pt: the fallback

    wait_for(lambda: [m.rcpt_tos for m in s.smtp.messages], "three e-mails (recipients)",
             until=lambda got: len(got) == 3, timeout=8, every=0.02)
    (en_mail,) = s.mails_to(EN)
    assert en_mail["Subject"] == "Your licence expires"
    en_text = en_mail.get_body(("plain",)).get_content()
    assert (
        en_text.startswith("Hello Ann!")
        and "Unsubscribe from these e-mails: https://kvadrupel.example/v1/unsubscribe/" in en_text
    )
    (ru_mail,) = s.mails_to(RU)
    assert ru_mail["Subject"] == "Права истекают"
    assert "Отписаться от этих писем" in ru_mail.get_body(("plain",)).get_content()

    wait_for(lambda: s.receiver.delivered, "the push", timeout=8, every=0.02)
    (push,) = s.receiver.delivered
    assert push["token"] == "tok-ann"
    assert push["notification"] == {
        "title": f"Your licence expires on {expires}",
        "body": "Ann, renew it",
    }
    assert push["data"]["banner_id"] == "dl-soon.1"

    # why do I see this (admin only)
    bid = s.banners(EN)[0]["id"]
    assert (
        s.client.get(f"/v1/users/{EN}/banners/{bid}/why", headers=s.auth("portal")).status_code
        == 401
    )
    wait_for(lambda: [m["status"] for m in s.client.get(
        f"/v1/users/{EN}/banners/{bid}/why", headers=s.auth("admin")).json()["messages"]],
        "every message of the banner sent (their statuses)",
        until=lambda statuses: all(st == "sent" for st in statuses), timeout=8, every=0.02)
    why = s.client.get(f"/v1/users/{EN}/banners/{bid}/why", headers=s.auth("admin")).json()
    assert why["rule"] == "dl-soon" and why["version"] == 1 and why["episode"] == 1
    assert why["as_of"] == AS_OF.isoformat() and why["lang"] == "en"
    assert why["fields"] == {"driver_license.expires_on": expires}
    assert why["banner"]["title"] == f"Your licence expires on {expires}"
    assert why["expires_at"].startswith(expires)  # the end of that day, Moscow time, in UTC
    assert sorted((m["channel"], m["status"]) for m in why["messages"]) == [
        ("email", "sent"), ("push", "sent")]
    r = s.client.get(f"/v1/users/{EN}/banners/dl-soon.7/why", headers=s.auth("admin"))
    assert r.status_code == 404

    d = s.client.get("/v1/deliveries", params={"rule": "dl-soon"}, headers=s.auth("admin")).json()
    assert d["channels"] == {"email": {"sent": 3}, "push": {"sent": 1}}
    assert d["dead_letters"] == []
    msgs = s.client.get(f"/v1/users/{EN}/messages", headers=s.auth("admin")).json()["messages"]
    assert {m["channel"] for m in msgs} == {"email", "push"}
    assert all(m["why"]["fields"] == {"driver_license.expires_on": expires} for m in msgs)


def test_unsubscribe_link_end_to_end(stack: Stack) -> None:
    s = stack
    s.post(_profile(EN, "en", "Ann"))
    wait_for(lambda: [m["Subject"] for m in s.mails_to(EN)], "the e-mail (subjects)",
             timeout=8, every=0.02)
    (mail,) = s.mails_to(EN)
    url = str(mail["List-Unsubscribe"]).strip("<>")
    assert url in mail.get_body(("html",)).get_content()
    path = urlsplit(url).path

    # Following the link (a mail scanner, a link preview, the user) changes nothing: it
    # shows a page whose button POSTs. No login.
    prefs_url = f"/v1/users/{EN}/preferences"
    for _ in range(3):
        page = s.client.get(path, headers={"Accept-Language": "en"})
        assert page.status_code == 200 and page.headers["referrer-policy"] == "no-referrer"
        assert "You will stop receiving e-mails of the category “documents”" in page.text
    assert s.client.get(prefs_url, headers=s.user_auth(EN)).json()["channel_categories"] == {}
    form = re.search(r'<form method="post" action="([^"]+)">(.*?)</form>', page.text, re.S)
    assert form is not None and urljoin(path, html.unescape(form.group(1))) == path
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">',
                             form.group(2)))
    assert fields["List-Unsubscribe"] == "One-Click"

    # The page's button: the same URL, the RFC 8058 body; answered with a page.
    done = s.client.post(path, data=fields, headers={"Accept-Language": "en"})
    assert done.status_code == 200 and "text/html" in done.headers["content-type"]
    assert "You will no longer receive e-mails of the category “documents”" in done.text
    prefs = s.client.get(prefs_url, headers=s.user_auth(EN)).json()
    assert prefs["channel_categories"] == {"email": {"documents": False}}
    assert prefs["channels"] == {}
    # Its "everything" link leads to another confirmation page, which acts on nothing.
    everything = re.search(r'<a href="([^"]+)">Unsubscribe from all e-mails</a>', done.text)
    assert everything is not None
    all_path = urljoin(path, html.unescape(everything.group(1)))
    assert all_path != path and all_path.startswith("/v1/unsubscribe/")
    assert "You will stop receiving e-mails." in s.client.get(
        all_path, headers={"Accept-Language": "en"}).text
    assert s.client.get(prefs_url, headers=s.user_auth(EN)).json()["channels"] == {}

    # the next episode shows the banner but sends no e-mail
    s.post({"event_id": "renewed", "user_id": EN,
            "set": {"driver_license": {"expires_on": (AS_OF + timedelta(days=400)).isoformat()}}})
    wait_for(lambda: [b["id"] for b in s.banners(EN)], "the exit (banners)",
             until=lambda ids: not ids, timeout=8, every=0.02)
    s.post(_profile(EN, "en", "Ann", days=5))
    wait_for(lambda: [b["id"] for b in s.banners(EN)], "episode 2 (banners)",
             until=lambda ids: bool(ids) and ids[0] == "dl-soon.2", timeout=8, every=0.02)
    wait_for(lambda: {m["status"] for m in s.container.ledger.entries(EN)},
             "the suppressed e-mail (ledger statuses)",
             until=lambda statuses: statuses == {"sent", "suppressed"}, timeout=8, every=0.02)
    assert len(s.mails_to(EN)) == 1

    # the one-click POST (RFC 8058) as a mail client sends it; a POST without the
    # one-click body; a broken token
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    r = s.client.post(path, content=b"List-Unsubscribe=One-Click",
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json() == {
        "unsubscribed": {"channel": "email", "category": "documents"}
    }
    r = s.client.post(path, files={"List-Unsubscribe": (None, "One-Click")})  # multipart
    assert r.status_code == 200 and r.json()["unsubscribed"]["category"] == "documents"
    for body in ({}, {"List-Unsubscribe": "yes"}):
        r = s.client.post(all_path, data=body)
        assert r.status_code == 400 and "One-Click" in r.json()["detail"]
    assert s.client.post(all_path, json={"List-Unsubscribe": "One-Click"}).status_code == 400
    assert s.client.get(prefs_url, headers=s.user_auth(EN)).json()["channels"] == {}
    bad = path[:-3] + ("AAA" if not path.endswith("AAA") else "BBB")
    assert s.client.get(bad).status_code == 404
    assert s.client.post(bad, data={"List-Unsubscribe": "One-Click"}).status_code == 404


def test_preferences_api(stack: Stack) -> None:
    s = stack
    url = f"/v1/users/{EN}/preferences"
    body = {"channels": {"push": False}, "categories": {"marketing": False}}
    r = s.client.put(url, json=body, headers=s.user_auth(EN))
    assert r.status_code == 200 and r.json() == body | {"channel_categories": {}}
    r = s.client.patch(url, json={"channel_categories": {"email": {"news": False}}},
                       headers=s.auth("portal"))
    assert r.json() == body | {"channel_categories": {"email": {"news": False}}}
    assert s.client.get(url, headers=s.user_auth(EN)).json() == r.json()
    assert s.client.get(url, headers=s.user_auth(RU)).status_code == 403
    assert s.client.get(url).status_code == 401
    assert s.client.put(url, json={"nope": 1}, headers=s.auth("portal")).status_code == 422


def test_impressions_and_clicks_are_counted_in_memory_and_flushed(stack: Stack) -> None:
    s = stack
    app = create_app(s.container)
    with TestClient(app) as client:  # runs the lifespan: the periodic and the final flush
        base = f"/v1/users/{EN}/banners/dl-soon.1"
        for _ in range(300):
            assert client.post(f"{base}/impression", headers=s.auth("portal")).status_code == 204
        for _ in range(12):
            assert client.post(f"{base}/click", headers=s.user_auth(EN)).status_code == 204
        assert client.post(f"/v1/users/{RU}/banners/dl-soon.1/click",
                           headers=s.user_auth(EN)).status_code == 403
        assert client.post(f"{base.replace('dl-soon', 'nope')}/click",
                           headers=s.auth("portal")).status_code == 404
        assert client.post(f"/v1/users/{EN}/banners/bad id/click",
                           headers=s.auth("portal")).status_code == 422
        counter = app.state.engagement
        today = counter.today()
        days = client.get("/v1/rules/dl-soon/engagement", headers=s.auth("admin"),
                          params={"since": today.isoformat()}).json()["days"]
        assert days == [{"day": today.isoformat(), "impressions": 300, "clicks": 12, "ctr": 0.04}]
    assert counter.flushes >= 1 and counter.pending() == {}
    with s.container.control.connect() as conn:
        rows = conn.execute(select(banner_stats)).all()
    assert [(r.rule_key, r.day, r.impressions, r.clicks) for r in rows] == [
        ("dl-soon", today, 300, 12)
    ]
