"""Compile an analyst's rule into a sandboxed function.

A rule is Python source defining ``def match(profile, ctx): ... return True/False``.
:func:`compile_rule` parses it, applies :class:`~rules.policy.RulePolicy` through
RestrictedPython's ``compile_restricted_exec`` (compile-time refusals become
:class:`~base.errors.RuleCompileError` with the 1-based source line), runs
the module (only ``def`` and constant assignments, so this is instant and has no
side effects) in a namespace whose ``__builtins__`` are the restricted builtins,
the helpers and the rule's guards, and returns a :class:`CompiledRule`.

See docs/rules.md for the policy as analysts see it, rules/policy.py and
rules/guards.py for the mechanics and their security review.
"""

from __future__ import annotations

import ast
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from RestrictedPython.compile import compile_restricted_exec

from base.errors import RuleCompileError, RuleError, RuleRuntimeError
from rules.budget import call_with_budget
from rules.goals import window_of_namespace
from rules.guards import SAFE_BUILTINS, container_ids, make_rule_guards
from rules.helpers import HELPERS
from rules.policy import RulePolicy

__all__ = [
    "DEFAULT_BUDGET_MS",
    "MAX_SOURCE_CHARS",
    "CompiledRule",
    "compile_rule",
    "describe_error",
]

DEFAULT_BUDGET_MS = 50.0
MAX_SOURCE_CHARS = 50_000
_LINE = re.compile(r"^Line (\d+|None): (.*)$", re.S)
_MAX_MESSAGE = 500
# Exceptions whose text is their arguments: safe to rebuild with truncated ones.
# fmt: off
_PLAIN_EXCEPTIONS = frozenset({
    Exception, ValueError, KeyError, TypeError, IndexError, LookupError, ArithmeticError,
    ZeroDivisionError, AttributeError, RuleRuntimeError,
})
# fmt: on


def describe_error(exc: BaseException) -> str:
    """``"KeyError: 'x'"`` for an exception raised by a rule, bounded in size.

    ``str(exc)`` itself could be huge (an exception carrying a list of 10**5 big
    strings) and is produced in one C call, so only scalar arguments are rendered.
    """
    name = type(exc).__name__
    args = exc.args
    if all(type(a) in (str, int, float, bool) or a is None for a in args):
        if sum(len(a) for a in args if type(a) is str) > 10 * _MAX_MESSAGE:
            args = tuple(a[:_MAX_MESSAGE] if type(a) is str else a for a in args)
            exc = type(exc)(*args) if type(exc) in _PLAIN_EXCEPTIONS else Exception(*args)
        try:
            text = str(exc)
        except (ValueError, TypeError):  # e.g. an int too large to print
            text = "<unprintable>"
    else:
        text = "<" + ", ".join(type(a).__name__ for a in args[:5]) + ">"
    if len(text) > _MAX_MESSAGE:
        text = text[:_MAX_MESSAGE] + "..."
    return f"{name}: {text}" if text else name


@dataclass(frozen=True, slots=True, eq=False)
class CompiledRule:
    """A compiled rule.

    ``match(profile, ctx)`` runs it standalone: the profile is read-only, the run is
    limited to ``budget_ms`` (:class:`~base.errors.RuleTimeout`), and anything
    the rule raises comes out as :class:`~base.errors.RuleRuntimeError`
    ("KeyError: 'x'"). ``raw`` is the sandboxed function itself, without that set-up,
    for :class:`~rules.ruleset.RuleSet`, which does it once per profile for all rules.
    """

    key: str
    source: str
    raw: Callable[[Any, Any], Any] = field(repr=False)
    budget_ms: float = DEFAULT_BUDGET_MS
    # The attribution window of the rule's goal in days (rules/goals.py); None: no goal.
    goal_window: int | None = None

    def match(self, profile: Any, ctx: Any) -> Any:
        """Evaluate the rule on one profile (bool-ish result)."""
        try:
            return call_with_budget(
                self.raw, profile, ctx, self.budget_ms / 1000.0 or None, f"rule {self.key!r}"
            )
        except RuleError:
            raise
        except Exception as exc:
            raise RuleRuntimeError(describe_error(exc)) from exc


def _compile_error(message: str, key: str) -> RuleCompileError:
    m = _LINE.match(message)
    if m:
        line = None if m.group(1) == "None" else int(m.group(1))
        return RuleCompileError(m.group(2), line)
    return RuleCompileError(message, None)


def compile_rule(
    source: str, key: str = "rule", budget_ms: float = DEFAULT_BUDGET_MS, tracked: bool = False,
    entry: str = "match",
) -> CompiledRule:
    """Compile ``source`` (which must define ``match(profile, ctx)``) into a :class:`CompiledRule`.

    Raises :class:`~base.errors.RuleCompileError` (``.reason``, ``.line``: 1-based)
    for syntax errors and sandbox policy violations. ``tracked``: compile for time
    horizons (rules/horizon.py): the same rule, with tracked helpers and guards; it
    behaves like the plain one with any context, and records horizons with a tracked
    one. May raise :class:`rules.horizon_policy.Untrackable`. ``entry``: the function
    :attr:`CompiledRule.raw` is (``"goal"``: the rule's goal, rules/goals.py; the
    goal and its window are validated whatever the entry).
    """
    if not isinstance(source, str):
        raise RuleCompileError("rule source must be a string")
    if len(source) > MAX_SOURCE_CHARS:
        raise RuleCompileError(f"rule source is longer than {MAX_SOURCE_CHARS:,} characters")
    filename = f"<rule:{key}>"
    try:
        # Warnings (SyntaxWarning "is" with a literal, invalid escapes) are not errors
        # of the rule; keep them from turning into exceptions where warnings are errors.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source, filename, "exec")
            if tracked:
                from rules.horizon_policy import TrackingPolicy

                result = compile_restricted_exec(tree, filename, policy=TrackingPolicy)
            else:
                result = compile_restricted_exec(tree, filename, policy=RulePolicy)
    except SyntaxError as exc:
        raise RuleCompileError(f"{type(exc).__name__}: {exc.msg}", exc.lineno) from None
    except (RecursionError, MemoryError):
        raise RuleCompileError("rule source is nested too deeply") from None
    if result.errors:
        raise _compile_error(result.errors[0], key)
    assert result.code is not None  # compiled without errors

    protected: set[int] = set()
    if tracked:
        from rules.horizon import tracked_builtins

        builtins = tracked_builtins(protected)
    else:
        builtins = {**SAFE_BUILTINS, **HELPERS, **make_rule_guards(protected)}
    namespace: dict[str, Any] = {"__builtins__": builtins, "__name__": f"rule:{key}"}
    try:
        exec(result.code, namespace)  # noqa: S102 - policy-checked code: defs and constants only
    except Exception as exc:  # e.g. a guard refusing a default value
        raise RuleCompileError(f"module code failed: {describe_error(exc)}", None) from None
    # Module-level constants are shared by every profile: make them read-only too.
    for name, value in namespace.items():
        if name != "__builtins__" and isinstance(value, (dict, list, set, tuple)):
            protected |= container_ids(value)
    window = window_of_namespace(namespace)
    if entry not in ("match", "goal") or not callable(namespace.get(entry)):
        raise RuleCompileError(f"the rule defines no `def {entry}(profile, ctx):`")
    return CompiledRule(key=key, source=source, raw=namespace[entry], budget_ms=budget_ms,
                        goal_window=window)
