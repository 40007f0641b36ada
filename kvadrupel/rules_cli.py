"""``kvadrupel rule ...``: a rule's canary rollout from the command line.

    kvadrupel rule rollout KEY PERCENT [--from VERSION]
    kvadrupel rule promote KEY
    kvadrupel rule rollback KEY

``rollout`` applies the rule's current version to PERCENT % of the users (by bucket;
docs/rules.md "Canary rollout"), the version saved before it (or ``--from``) to the
rest; on a running canary it changes the share. ``promote`` gives everyone the new
version, ``rollback`` the old one. Every change is written to the admin audit log
with the actor ``cli``.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["add_parser", "run_rule"]


def add_parser(sub: Any) -> None:
    """Register ``rule`` and its subcommands on the CLI's subparsers."""
    r = sub.add_parser("rule", help="a rule's canary rollout (rollout, promote, rollback)")
    rs = r.add_subparsers(dest="rule_cmd", required=True)
    ro = rs.add_parser("rollout", help="the current version for PERCENT %% of the users")
    ro.add_argument("key")
    ro.add_argument("percent", type=int)
    ro.add_argument("--from", dest="from_version", type=int, default=None,
                    help="the version the other users stay on (default: the one before)")
    rs.add_parser("promote", help="end the canary: the new version for everyone").add_argument(
        "key")
    rs.add_parser("rollback", help="end the canary: everyone back on the old version"
                  ).add_argument("key")


def _describe(rule: dict[str, Any]) -> str:
    if rule["rollout"] is None:
        return f"{rule['key']}: v{rule['version']} for everyone"
    return (f"{rule['key']}: v{rule['version']} for {rule['rollout']} % of the users, "
            f"v{rule['rollout_from']} for the rest")


def run_rule(args: Any, container: Any) -> int:
    from base.errors import Conflict, NotFound, RuleValidationError

    svc = container.rules
    try:
        if args.rule_cmd == "rollout":
            rule = svc.rollout(args.key, args.percent, "cli", args.from_version)
        elif args.rule_cmd == "promote":
            rule = svc.promote(args.key, "cli")
        else:
            rule = svc.rollback(args.key, "cli")
    except (ValueError, Conflict, NotFound, RuleValidationError) as exc:
        print(f"kvadrupel: {exc}", file=sys.stderr)
        return 1
    print(_describe(rule))
    return 0
