"""The admin UI's own tables in the control database: accounts, audit log,
activation requests.

Rules and runs are *not* here: the UI reads and writes them only through
:class:`catalogue.service.RuleService` and :class:`engine.runs.RunService`. What lives
here is what only the UI needs — who may sign in, who did what, and who asked for a
rule to go live and who approved it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, case, func, select, update

from api.admin.passwords import hash_password, needs_rehash, verify_password
from base.clock import SYSTEM, Clock
from base.errors import Conflict, NotFound
from shards.schema import activation_requests, admin_audit, admin_users

__all__ = ["ROLES", "AccountStore", "ActivationStore", "AuditLog"]

ROLES = ("analyst", "approver", "admin")
USERNAME_MAX = 64
PASSWORD_MIN = 10


def check_username(name: str) -> str:
    name = name.strip()
    if not name or len(name) > USERNAME_MAX or not all(c.isalnum() or c in "._-@" for c in name):
        raise ValueError(f"user name: 1-{USERNAME_MAX} letters, digits and . _ - @")
    return name


def check_password(password: str) -> str:
    if len(password) < PASSWORD_MIN:
        raise ValueError(f"password: at least {PASSWORD_MIN} characters")
    if len(password) > 1024:
        raise ValueError("password: at most 1024 characters")
    return password


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    return role


class AccountStore:
    """Admin UI accounts: argon2id password hashes and a role each."""

    def __init__(self, control: Engine, clock: Clock = SYSTEM) -> None:
        self.control = control
        self.clock = clock

    def add(self, username: str, password: str, role: str) -> dict[str, Any]:
        username, role = check_username(username), check_role(role)
        check_password(password)
        ts = self.clock.now()
        with self.control.begin() as conn:
            if conn.execute(
                select(admin_users.c.username).where(admin_users.c.username == username)
            ).first():
                raise Conflict(f"user {username!r} exists")
            conn.execute(
                admin_users.insert().values(
                    username=username,
                    password_hash=hash_password(password),
                    role=role,
                    active=True,
                    session_gen=1,
                    created_at=ts,
                    updated_at=ts,
                )
            )
        return self.get(username)

    def get(self, username: str) -> dict[str, Any]:
        with self.control.connect() as conn:
            r = conn.execute(select(admin_users).where(admin_users.c.username == username)).first()
        if r is None:
            raise NotFound(f"no user {username!r}")
        return self._row(r)

    def find(self, username: str) -> dict[str, Any] | None:
        try:
            return self.get(username)
        except NotFound:
            return None

    @staticmethod
    def _row(r: Any) -> dict[str, Any]:
        d = dict(r._mapping)
        d.pop("password_hash", None)
        return d

    def list(self) -> list[dict[str, Any]]:
        with self.control.connect() as conn:
            rows = conn.execute(select(admin_users).order_by(admin_users.c.username)).all()
        return [self._row(r) for r in rows]

    def count(self) -> int:
        with self.control.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(admin_users)).scalar_one())

    def authenticate(self, username: str, password: str) -> dict[str, Any] | None:
        """The user if the password is right and the account active, else None.
        Takes about as long for an unknown user as for a wrong password."""
        with self.control.connect() as conn:
            r = conn.execute(select(admin_users).where(admin_users.c.username == username)).first()
        if r is None:
            verify_password(None, password)
            return None
        if not verify_password(r.password_hash, password) or not r.active:
            return None
        if needs_rehash(r.password_hash):
            with self.control.begin() as conn:
                conn.execute(
                    update(admin_users)
                    .where(admin_users.c.username == username)
                    .values(password_hash=hash_password(password))
                )
        return self._row(r)

    def _set(self, username: str, **values: Any) -> dict[str, Any]:
        with self.control.begin() as conn:
            res = conn.execute(
                update(admin_users)
                .where(admin_users.c.username == username)
                .values(updated_at=self.clock.now(), **values)
                .returning(admin_users.c.username)
            )
            if res.first() is None:
                raise NotFound(f"no user {username!r}")
        return self.get(username)

    def set_password(self, username: str, password: str) -> dict[str, Any]:
        check_password(password)
        # A new password signs every existing session out.
        return self._set(
            username,
            password_hash=hash_password(password),
            session_gen=admin_users.c.session_gen + 1,
        )

    def set_role(self, username: str, role: str) -> dict[str, Any]:
        # A different role signs the account's sessions out (the same one changes nothing).
        role = check_role(role)
        return self._set(
            username,
            role=role,
            session_gen=admin_users.c.session_gen
            + case((admin_users.c.role != role, 1), else_=0),
        )

    def end_sessions(self, username: str) -> dict[str, Any]:
        """Bump the account's session generation: every session cookie issued
        before (copies included) is refused from now on. Signing out does this."""
        return self._set(username, session_gen=admin_users.c.session_gen + 1)

    def set_active(self, username: str, active: bool) -> dict[str, Any]:
        return self._set(username, active=active, session_gen=admin_users.c.session_gen + 1)


class AuditLog:
    """Append-only: who did what, when, and what changed."""

    def __init__(self, control: Engine, clock: Clock = SYSTEM) -> None:
        self.control = control
        self.clock = clock

    def record(
        self,
        actor: str,
        action: str,
        target: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        with self.control.begin() as conn:
            conn.execute(
                admin_audit.insert().values(
                    at=self.clock.now(), actor=actor, action=action, target=target,
                    detail=detail or {},
                )
            )

    def list(self, target: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        q = select(admin_audit).order_by(admin_audit.c.id.desc()).limit(limit)
        if target:
            q = q.where(admin_audit.c.target == target)
        with self.control.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q).all()]

    def ever(self, action: str, target: str) -> bool:
        with self.control.connect() as conn:
            return (
                conn.execute(
                    select(admin_audit.c.id)
                    .where((admin_audit.c.action == action) & (admin_audit.c.target == target))
                    .limit(1)
                ).first()
                is not None
            )


class ActivationStore:
    """Requests to turn a rule version on, and their decisions."""

    def __init__(self, control: Engine, clock: Clock = SYSTEM) -> None:
        self.control = control
        self.clock = clock

    def create(
        self,
        key: str,
        version: int,
        requested_by: str,
        audience: int | None,
        note: str | None,
        status: str = "pending",
    ) -> dict[str, Any]:
        ts = self.clock.now()
        with self.control.begin() as conn:
            # One open request per rule: a newer one replaces the older.
            conn.execute(
                update(activation_requests)
                .where(
                    (activation_requests.c.rule_key == key)
                    & (activation_requests.c.status == "pending")
                )
                .values(status="withdrawn", decided_by=requested_by, decided_at=ts)
            )
            rid = conn.execute(
                activation_requests.insert()
                .values(
                    rule_key=key,
                    version=version,
                    status=status,
                    requested_by=requested_by,
                    requested_at=ts,
                    audience=audience,
                    note=note,
                    decided_by=requested_by if status != "pending" else None,
                    decided_at=ts if status != "pending" else None,
                )
                .returning(activation_requests.c.id)
            ).scalar_one()
        return self.get(int(rid))

    def get(self, rid: int) -> dict[str, Any]:
        with self.control.connect() as conn:
            r = conn.execute(
                select(activation_requests).where(activation_requests.c.id == rid)
            ).first()
        if r is None:
            raise NotFound(f"no activation request {rid}")
        return dict(r._mapping)

    def decide(self, rid: int, status: str, by: str, expect: str = "pending") -> bool:
        """Move a request from ``expect`` to ``status``; False if someone was first."""
        with self.control.begin() as conn:
            res = conn.execute(
                update(activation_requests)
                .where((activation_requests.c.id == rid) & (activation_requests.c.status == expect))
                .values(status=status, decided_by=by, decided_at=self.clock.now())
                .returning(activation_requests.c.id)
            )
            return res.first() is not None

    def reopen(self, rid: int) -> None:
        with self.control.begin() as conn:
            conn.execute(
                update(activation_requests)
                .where(activation_requests.c.id == rid)
                .values(status="pending", decided_by=None, decided_at=None)
            )

    def pending(self, key: str | None = None) -> list[dict[str, Any]]:
        q = select(activation_requests).where(activation_requests.c.status == "pending")
        if key:
            q = q.where(activation_requests.c.rule_key == key)
        with self.control.connect() as conn:
            return [
                dict(r._mapping) for r in conn.execute(q.order_by(activation_requests.c.id)).all()
            ]

    def history(self, key: str, limit: int = 20) -> list[dict[str, Any]]:
        with self.control.connect() as conn:
            rows = conn.execute(
                select(activation_requests)
                .where(activation_requests.c.rule_key == key)
                .order_by(activation_requests.c.id.desc())
                .limit(limit)
            ).all()
        return [dict(r._mapping) for r in rows]

    def ever_approved(self) -> set[str]:
        """Keys of rules that went live through the UI at least once."""
        with self.control.connect() as conn:
            return set(
                conn.execute(
                    select(activation_requests.c.rule_key)
                    .where(activation_requests.c.status.in_(("approved", "auto-approved")))
                    .distinct()
                ).scalars()
            )
