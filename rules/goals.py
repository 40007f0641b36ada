"""A rule's goal: what counts as a conversion after one of its episodes starts.

A rule may define, next to ``match``, a predicate ``goal(profile, ctx)`` (the same
sandbox, helpers and policy: it is compiled with the rule) and the attribution
window ``GOAL_WINDOW_DAYS`` (an integer constant, 1..365, default 30)::

    def match(profile, ctx): ...

    GOAL_WINDOW_DAYS = 60

    def goal(profile, ctx):
        return date(get(profile, "driver_license.renewed_on")) is not None

The evaluator runs the goal in the same sandboxed call as the rules, as a companion
entry of the rule set keyed :func:`goal_key` (so its read-set, time horizon, budget
and errors are handled like a rule's). After an episode of the rule starts — real
or ghost — an evaluation on a day within the window at which the goal holds emits a
:class:`~engine.messages.Convert`; the delivery worker records the first one per
episode (channels/goals.py). See docs/channels.md, "Goals and experiments".
"""

from __future__ import annotations

import ast
from datetime import date, timedelta
from typing import Any

from base.errors import RuleCompileError

__all__ = ["DEFAULT_WINDOW_DAYS", "GOAL_SUFFIX", "MAX_WINDOW_DAYS", "WINDOW_NAME", "base_key",
           "goal_key", "goal_window", "in_window", "is_goal_key", "window_of_namespace"]

GOAL_SUFFIX = "#goal"  # never part of a rule key (rules/models.py KEY_RE)
WINDOW_NAME = "GOAL_WINDOW_DAYS"
DEFAULT_WINDOW_DAYS = 30
MAX_WINDOW_DAYS = 365


def goal_key(key: str) -> str:
    return key + GOAL_SUFFIX


def is_goal_key(key: str) -> bool:
    return key.endswith(GOAL_SUFFIX)


def base_key(key: str) -> str:
    return key[: -len(GOAL_SUFFIX)] if key.endswith(GOAL_SUFFIX) else key


def window_of_namespace(namespace: dict[str, Any]) -> int | None:
    """The attribution window of a compiled rule's module namespace (None: no goal).
    Raises :class:`RuleCompileError` for a window that is not an integer 1..365, or
    one declared without a goal."""
    has_goal = callable(namespace.get("goal"))
    if WINDOW_NAME not in namespace:
        return DEFAULT_WINDOW_DAYS if has_goal else None
    value = namespace[WINDOW_NAME]
    if not has_goal:
        raise RuleCompileError(f"{WINDOW_NAME} is set but the rule defines no "
                               "`def goal(profile, ctx):`")
    if type(value) is not int or not 1 <= value <= MAX_WINDOW_DAYS:
        raise RuleCompileError(f"{WINDOW_NAME} must be a whole number of days from 1 to "
                               f"{MAX_WINDOW_DAYS}, not {value!r}"[:300])
    return value


def goal_window(source: str) -> int | None:
    """The attribution window of ``source`` read from its syntax alone (None: no
    goal) — for a rule already validated at save; a malformed window gives None."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not any(isinstance(n, ast.FunctionDef) and n.name == "goal" for n in tree.body):
        return None
    window = DEFAULT_WINDOW_DAYS
    for n in tree.body:
        if isinstance(n, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == WINDOW_NAME for t in n.targets):
            v = n.value
            if isinstance(v, ast.Constant) and type(v.value) is int \
                    and 1 <= v.value <= MAX_WINDOW_DAYS:
                window = v.value
            else:
                return None
    return window


def in_window(started: date, today: date, window_days: int) -> bool:
    """Whether ``today`` is within ``window_days`` days of an episode started on
    ``started`` (the start day is day 0; day ``window_days`` is the last)."""
    return started <= today <= started + timedelta(days=window_days)
