"""Accounts, audit log and activation requests on both control databases, and the
``kvadrupel user`` commands."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, select

from api.admin.passwords import hash_password, verify_password
from api.admin.store import AccountStore, ActivationStore, AuditLog
from base.errors import Conflict, NotFound
from kvadrupel import cli
from shards.migrations import runner
from shards.schema import admin_users


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def control(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        engine = create_engine(f"sqlite:///{tmp_path / 'control.db'}")
        runner.upgrade("control", engine)
    else:
        engine = create_engine(request.getfixturevalue("pg_factory")(0).control)
    try:
        yield engine
    finally:
        engine.dispose()


def test_accounts(control: Engine) -> None:
    accounts = AccountStore(control)
    user = accounts.add("ana", "a-long-password", "analyst")
    assert user == accounts.get("ana") and "password_hash" not in user
    assert user["role"] == "analyst" and user["active"] is True and user["session_gen"] == 1
    with control.connect() as conn:
        stored = conn.execute(select(admin_users.c.password_hash)).scalar_one()
    assert stored.startswith("$argon2id$") and "a-long-password" not in stored
    assert accounts.authenticate("ana", "a-long-password")["username"] == "ana"
    assert accounts.authenticate("ana", "wrong-password") is None
    assert accounts.authenticate("nobody", "a-long-password") is None
    with pytest.raises(Conflict):
        accounts.add("ana", "another-password", "admin")
    for bad in (
        ("", "a-long-password", "admin"),
        ("x y", "a-long-password", "admin"),
        ("bob", "short", "admin"),
        ("bob", "a-long-password", "root"),
    ):
        with pytest.raises(ValueError):
            accounts.add(*bad)
    assert accounts.set_password("ana", "a-newer-password")["session_gen"] == 2
    assert accounts.authenticate("ana", "a-long-password") is None
    assert accounts.set_role("ana", "approver")["role"] == "approver"
    accounts.set_active("ana", False)
    assert accounts.authenticate("ana", "a-newer-password") is None  # disabled
    with pytest.raises(NotFound):
        accounts.set_role("nobody", "admin")
    assert [u["username"] for u in accounts.list()] == ["ana"] and accounts.count() == 1


def test_audit_and_activation_requests(control: Engine) -> None:
    audit = AuditLog(control)
    audit.record("ana", "rule.save", "rule:x", {"diff": {"source": "+a\n-b"}, "version": 2})
    audit.record("pat", "rule.pause", "rule:y", {})
    (entry,) = audit.list(target="rule:x")
    assert entry["actor"] == "ana" and entry["detail"]["version"] == 2 and entry["at"].tzinfo
    assert audit.ever("rule.pause", "rule:y") and not audit.ever("rule.pause", "rule:x")

    acts = ActivationStore(control)
    first = acts.create("x", 1, "ana", 12, "please")
    second = acts.create("x", 2, "ana", 15, None)  # replaces the open request
    assert acts.get(first["id"])["status"] == "withdrawn"
    assert [p["id"] for p in acts.pending("x")] == [second["id"]]
    assert acts.decide(second["id"], "approved", "pat") is True
    assert acts.decide(second["id"], "rejected", "quinn") is False  # somebody was first
    assert acts.ever_approved() == {"x"}
    acts.create("y", 1, "ana", 0, None, status="auto-approved")
    assert acts.ever_approved() == {"x", "y"}
    assert [h["version"] for h in acts.history("x")] == [2, 1]


def test_password_hashes() -> None:
    h = hash_password("correct horse")
    assert verify_password(h, "correct horse")
    assert not verify_password(h, "wrong horse")
    assert not verify_password(None, "correct horse")
    assert not verify_password("not-a-hash", "correct horse")


def test_user_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KVADRUPEL_DATA_DIR", str(tmp_path))
    monkeypatch.setattr("sys.stdin", io.StringIO("a-long-password\n"))
    assert cli.main(["user", "add", "root", "--role", "admin", "--password-stdin"]) == 2
    assert "kvadrupel migrate" in capsys.readouterr().err
    assert cli.main(["migrate"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("a-long-password\n"))
    assert cli.main(["user", "add", "root", "--role", "admin", "--password-stdin"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("a-long-password\n"))
    assert cli.main(["user", "add", "root", "--role", "admin", "--password-stdin"]) == 1
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert cli.main(["user", "add", "ana", "--role", "analyst", "--password-stdin"]) == 1
    assert cli.main(["user", "role", "root", "approver"]) == 0
    assert cli.main(["user", "disable", "root"]) == 0
    capsys.readouterr()
    assert cli.main(["user", "list"]) == 0
    assert capsys.readouterr().out.split() == ["root", "approver", "disabled"]
    engine = create_engine(f"sqlite:///{tmp_path / 'control.db'}")
    try:
        actions = [e["action"] for e in AuditLog(engine).list()]
        assert actions == ["user.disable", "user.role", "user.add"]
        assert {e["actor"] for e in AuditLog(engine).list()} == {"cli"}
    finally:
        engine.dispose()
