"""Fixtures for the admin UI: an embedded Kvadrupel with accounts, served for real.

* ``admin_env`` — an embedded container (SQLite shards, in-process bus, outbox) in
  ``tmp_path`` with three accounts, a few profiles and a TestClient on the app;
* ``live_server`` — the same app served by uvicorn in a thread on a free port,
  with the ingest/evaluate/deliver workers running, for the browser tests.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.admin.store import AccountStore
from api.app import create_app
from base.clock import Clock
from kvadrupel.container import Container
from kvadrupel.settings import Settings
from tests.fixtures.waiting import wait_for

AS_OF = date(2026, 11, 24)
TOKENS = {
    "admin_token": "adm-" + "x" * 20,
    "ingest_token": "ing-" + "y" * 20,
    "portal_token": "por-" + "z" * 20,
}
PASSWORDS = {
    "ana": "analyst-password-1",
    "pat": "approver-password-1",
    "quinn": "approver-password-2",
    "root": "admin-password-01",
}
ROLES = {"ana": "analyst", "pat": "approver", "quinn": "approver", "root": "admin"}

# user id -> vehicle registration expiry: 1001 matches "expires within 14 days" on AS_OF,
# 1003 starts matching later (the forecast sees it), the others never do.
PROFILES: dict[int, dict[str, Any]] = {
    1001: {"name": "Anna", "vehicle": {"plate": "A123BC", "registration_expires_on": "2026-12-02"}},
    1002: {
        "name": "Boris",
        "vehicle": {"plate": "B456DE", "registration_expires_on": "2027-06-01"},
    },
    1003: {"name": "Vera", "vehicle": {"plate": "C789FG", "registration_expires_on": "2026-12-15"}},
    1004: {"name": "Gleb"},
}
for uid in range(2000, 2040):  # a population for preview/forecast to chew on
    PROFILES[uid] = {
        "name": f"user {uid}",
        "vehicle": {"registration_expires_on": f"2026-12-{(uid % 28) + 1:02d}"},
    }


def settings_for(data_dir: Path, **overrides: Any) -> Settings:
    return Settings(
        data_dir=data_dir,
        admin_session_secret="s" * 40,
        admin_approval_audience=0,
        admin_preview_sample=0,
        **TOKENS | overrides,
    )


def make_container(settings: Settings) -> Container:
    c = Container(settings, clock=Clock.pinned(AS_OF, settings.timezone))
    c.migrate()
    accounts = AccountStore(c.control)
    for name, role in ROLES.items():
        accounts.add(name, PASSWORDS[name], role)
    shards = c.shards
    by_shard: dict[int, list[tuple[int, dict[str, Any]]]] = {}
    for uid, doc in PROFILES.items():
        by_shard.setdefault(shards.router.shard_of(uid), []).append((uid, doc))
    for s, docs in by_shard.items():
        shards.stores[s].put_profiles(docs)
    return c


CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass
class AdminClient:
    """A TestClient signed in as one user, with the session's CSRF token."""

    client: TestClient
    csrf: str = ""

    def login(self, name: str) -> AdminClient:
        page = self.client.get("/admin/login")
        token = CSRF_RE.search(page.text).group(1)
        r = self.client.post(
            "/admin/login",
            data={"username": name, "password": PASSWORDS[name], "csrf_token": token},
        )
        assert r.status_code == 200 and "/admin/login" not in str(r.url), r.text
        self.refresh()
        return self

    def refresh(self) -> None:
        self.csrf = CSRF_RE.search(self.client.get("/admin/").text).group(1)

    def post(self, path: str, data: dict[str, Any] | None = None, **kw: Any) -> Any:
        return self.client.post(path, data={"csrf_token": self.csrf, **(data or {})}, **kw)


@dataclass
class AdminEnv:
    container: Container
    app: Any
    clients: list[TestClient] = field(default_factory=list)

    def as_user(self, name: str | None) -> AdminClient:
        client = TestClient(self.app, follow_redirects=True)
        self.clients.append(client)
        ac = AdminClient(client)
        return ac.login(name) if name else ac


@pytest.fixture
def admin_env(tmp_path: Path) -> Iterator[AdminEnv]:
    c = make_container(settings_for(tmp_path / "data"))
    env = AdminEnv(c, create_app(c))
    try:
        yield env
    finally:
        for cl in env.clients:
            cl.close()
        c.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    url: str
    container: Container


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    import uvicorn

    c = make_container(settings_for(tmp_path_factory.mktemp("admin") / "data"))
    stop = threading.Event()
    workers = [
        c.ingest_worker().start_thread(stop),
        c.evaluator_worker().start_thread(stop),
        c.delivery_worker().start_thread(stop),
    ]
    port = _free_port()
    config = uvicorn.Config(
        create_app(c),
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        lifespan="off",
        ws="none",
        http="h11",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="admin-uvicorn", daemon=True)
    thread.start()

    def started() -> bool:
        assert thread.is_alive(), "uvicorn exited while starting"
        return server.started

    wait_for(started, f"uvicorn to start on port {port}", timeout=10, every=0.02)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", c)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        stop.set()
        for t in workers:
            t.join(timeout=10)
        c.close()
