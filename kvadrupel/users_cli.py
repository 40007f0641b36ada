"""``kvadrupel user ...``: admin UI accounts from the command line.

    kvadrupel user add NAME --role analyst|approver|admin [--password-stdin]
    kvadrupel user passwd NAME [--password-stdin]
    kvadrupel user role NAME ROLE
    kvadrupel user disable NAME | enable NAME
    kvadrupel user list

Without ``--password-stdin`` the password is asked twice on the terminal (never
taken from the command line, where ``ps`` and shell history would see it). Every
change is written to the admin audit log with the actor ``cli``.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

__all__ = ["add_parser", "run_user"]

ROLES = ("analyst", "approver", "admin")


def add_parser(sub: Any) -> None:
    """Register ``user`` and its subcommands on the CLI's subparsers."""
    u = sub.add_parser("user", help="admin UI accounts (add, passwd, role, disable, enable, list)")
    us = u.add_subparsers(dest="user_cmd", required=True)
    add = us.add_parser("add", help="create an account")
    add.add_argument("name")
    add.add_argument("--role", choices=ROLES, required=True)
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    pw = us.add_parser("passwd", help="set a new password (signs the user out everywhere)")
    pw.add_argument("name")
    pw.add_argument("--password-stdin", action="store_true")
    ro = us.add_parser("role", help="change an account's role")
    ro.add_argument("name")
    ro.add_argument("role", choices=ROLES)
    for cmd, text in (
        ("disable", "stop an account signing in"),
        ("enable", "let it sign in again"),
    ):
        us.add_parser(cmd, help=text).add_argument("name")
    us.add_parser("list", help="list accounts")


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        raise ValueError("the passwords differ")
    return first


def run_user(args: argparse.Namespace, container: Any) -> int:
    from sqlalchemy import inspect

    from api.admin.store import AccountStore, AuditLog
    from base.errors import Conflict, NotFound

    if not inspect(container.control).has_table("admin_users"):
        print("kvadrupel: no accounts table yet: run `kvadrupel migrate` first", file=sys.stderr)
        return 2
    accounts = AccountStore(container.control, container.clock)
    audit = AuditLog(container.control, container.clock)
    cmd = args.user_cmd
    name: str = getattr(args, "name", "")  # every command but ``list`` takes one
    try:
        if cmd == "list":
            for u in accounts.list():
                state = "active" if u["active"] else "disabled"
                print(f"{u['username']:<24} {u['role']:<9} {state}")
            return 0
        if cmd == "add":
            user = accounts.add(name, _password(args.password_stdin), args.role)
            audit.record("cli", "user.add", f"user:{user['username']}", {"role": args.role})
            print(f"added {user['username']} ({args.role})")
        elif cmd == "passwd":
            accounts.set_password(name, _password(args.password_stdin))
            audit.record("cli", "user.password", f"user:{name}", {})
            print(f"password of {name} changed")
        elif cmd == "role":
            before = accounts.get(name)["role"]
            accounts.set_role(name, args.role)
            audit.record(
                "cli", "user.role", f"user:{name}", {"role": {"from": before, "to": args.role}}
            )
            print(f"{name} is now {args.role}")
        elif cmd in ("disable", "enable"):
            accounts.set_active(name, cmd == "enable")
            audit.record("cli", f"user.{cmd}", f"user:{name}", {})
            print(f"{name} {cmd}d")
        return 0
    except (ValueError, Conflict, NotFound) as exc:
        print(f"kvadrupel: {exc}", file=sys.stderr)
        return 1
