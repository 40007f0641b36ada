"""The compile-time policy of the rule sandbox: a RestrictedPython node transformer.

On top of RestrictedPython's checks (no names or attributes starting with ``_``,
no frame/generator/traceback attributes, no ``exec``/``eval``, no async, no
``except*``) it refuses: imports, classes, decorators, ``yield``, ``global``,
``nonlocal``, ``with``, ``try/finally``, bare ``except`` and exception names other
than :data:`~rules.guards.CATCHABLE` (so not ``Exception``), rebinding exception
names, attribute writes,
slice assignment, mutable default arguments, dynamic, long (over
:data:`MAX_SPEC_CHARS`) or huge (width/precision over 999) f-string format specs,
f-strings whose specs alone could exceed MAX_STR, forbidden builtins
(:data:`FORBIDDEN_NAMES`) and attributes (:data:`FORBIDDEN_ATTRS`), and top-level
code other than ``def`` and constant assignments. ``match(profile, ctx)`` must be
defined exactly once with two positional parameters.

Rewrites, for speed: attribute loads, subscripts, iteration and unpacking stay
plain Python (RestrictedPython would route each through a guard call). That is
safe because attribute names are static (no ``getattr``) and checked here, and
the objects a rule can reach have no dangerous ``__getitem__``/``__iter__``.
Only these go through guards (rules/guards.py): loads of mutating or
size-sensitive methods (``_getattr_``; ``s.lower()``-style calls without
arguments become ``_lower_(s)``, a cheaper direct check), item writes
(``_write_``), ``x op= y`` (``_inplacevar_``), ``*``, ``**``, ``<<``, ``%``, ``+``
of two non-constants, f-string values (``_render_``: each of the ``k`` values of
an f-string gets ``MAX_STR / k``; a conversion or spec is applied by the guard),
and starred items of list/tuple/set displays and calls (``_unpack_``).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable

from RestrictedPython.transformer import (
    INSPECT_ATTRIBUTES,
    RestrictingNodeTransformer,
    copy_locations,
)

from rules.guards import (
    CATCHABLE,
    EXCEPTION_NAMES,
    GUARDED_ATTRS,
    MAX_ITEMS,
    MAX_STR,
    NULLARY_CALLS,
    UNSAFE_ATTRS,
)

__all__ = ["FORBIDDEN_ATTRS", "FORBIDDEN_NAMES", "RulePolicy"]

# fmt: off
FORBIDDEN_NAMES = frozenset({
    "exec", "eval", "compile", "open", "globals", "locals", "vars", "getattr", "setattr",
    "delattr", "hasattr", "type", "dir", "help", "breakpoint", "input", "print", "printed",
    "exit", "quit", "memoryview", "object", "super", "classmethod", "staticmethod", "property",
    "id", "iter", "next", "format", "repr", "ascii", "bytes", "bytearray", "callable", "hash",
    "issubclass", "license", "credits", "copyright", "BaseException", "BaseExceptionGroup",
    "ExceptionGroup", "SystemExit", "KeyboardInterrupt", "GeneratorExit", "StopIteration",
    "builtins", "reload",
})

# Not dunders, yet dangerous or unbounded on reachable objects (UNSAFE_ATTRS: mro,
# to_bytes/from_bytes, ZoneInfo's clear_cache/no_cache/from_file, with_traceback;
# the template sandbox refuses those too).
FORBIDDEN_ATTRS = frozenset({
    "format", "format_map",  # '{0.__class__}'.format(x) walks attributes
    "ljust", "rjust", "center", "zfill", "expandtabs", "translate", "maketrans",  # sizes
}) | UNSAFE_ATTRS | INSPECT_ATTRIBUTES
# fmt: on
FORBIDDEN_ATTR_PREFIXES = ("gi_", "cr_", "ag_", "tb_", "f_", "co_")

_BINOP_GUARDS = {ast.Mult: "_mul_", ast.Pow: "_pow_", ast.LShift: "_lshift_", ast.Mod: "_mod_"}
_BIG_NUMBER = re.compile(r"\d{4,}")
_NUMBER = re.compile(r"\d+")
MAX_SPEC_CHARS = 100  # an f-string format spec (a date's spec is strftime: up to 12x)
# none, !r, !a, !s: render_guard's mode (STR/REPR/ASCII, and 3 for an explicit str())
_CONVERSION_MODE = {-1: 0, 114: 1, 97: 2, 115: 3}
_TOP = "only `def` and constant assignments are allowed at the top level of a rule"


def _is_literal(node: ast.AST, mutable_ok: bool = True) -> bool:
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return isinstance(node.operand, ast.Constant)
    if isinstance(node, ast.Tuple):
        return all(_is_literal(e, mutable_ok) for e in node.elts)
    if not mutable_ok:
        return False
    if isinstance(node, (ast.List, ast.Set)):
        return all(_is_literal(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        return all(k is not None and _is_literal(k) for k in node.keys) and all(
            _is_literal(v) for v in node.values
        )
    return False


# What a visit method may return, as RestrictingNodeTransformer declares it: a node,
# nodes to splice in its place, or None to drop it.
_Visited = ast.AST | Iterable[ast.AST] | None
# Attribute set on a FormattedValue by visit_JoinedStr: the text limit of its value.
_KV_LIMIT = "kv_limit"


class RulePolicy(RestrictingNodeTransformer):
    """RestrictedPython policy for rules (see the module docstring)."""

    # -- module level ---------------------------------------------------------
    def visit_Module(self, node: ast.Module) -> _Visited:
        matches = []
        goals = []
        for stmt in node.body:
            if isinstance(stmt, ast.FunctionDef):
                if stmt.name == "match":
                    matches.append(stmt)
                elif stmt.name == "goal":
                    goals.append(stmt)
            elif isinstance(stmt, ast.Assign):
                if not all(isinstance(t, ast.Name) for t in stmt.targets) or not _is_literal(
                    stmt.value
                ):
                    self.error(stmt, _TOP)
                elif any(isinstance(t, ast.Name) and t.id == "match" for t in stmt.targets):
                    self.error(stmt, "`match` must be a function: def match(profile, ctx):")
                elif any(isinstance(t, ast.Name) and t.id == "goal" for t in stmt.targets):
                    self.error(stmt, "`goal` must be a function: def goal(profile, ctx):")
            elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                pass  # docstring
            elif not isinstance(stmt, ast.Pass):
                self.error(stmt, _TOP)
        if not matches:
            self.error(ast.Pass(lineno=1), "the rule must define `def match(profile, ctx):`")
        for extra in matches[1:]:
            self.error(extra, "`match` is defined more than once")
        if matches:
            a = matches[0].args
            if a.vararg or a.kwarg or a.kwonlyargs or len(a.posonlyargs) + len(a.args) != 2:
                self.error(
                    matches[0], "`match` must take exactly two arguments: def match(profile, ctx):"
                )
        # An optional goal (rules/goals.py): the same shape as match, at most once.
        for extra in goals[1:]:
            self.error(extra, "`goal` is defined more than once")
        if goals:
            a = goals[0].args
            if a.vararg or a.kwarg or a.kwonlyargs or len(a.posonlyargs) + len(a.args) != 2:
                self.error(
                    goals[0], "`goal` must take exactly two arguments: def goal(profile, ctx):"
                )
        return super().visit_Module(node)

    # -- statements refused ----------------------------------------------------
    def visit_Import(self, node: ast.AST) -> None:
        self.error(node, "imports are not allowed in rules")

    visit_ImportFrom = visit_Import

    def visit_ClassDef(self, node: ast.AST) -> None:
        self.error(node, "classes are not allowed in rules")

    def visit_Global(self, node: ast.AST) -> None:
        self.error(node, "`global` is not allowed in rules")

    def visit_Nonlocal(self, node: ast.AST) -> None:
        self.error(node, "`nonlocal` is not allowed in rules")

    def visit_Yield(self, node: ast.AST) -> None:
        self.error(node, "`yield` (generator functions) is not allowed in rules")

    visit_YieldFrom = visit_Yield

    def visit_With(self, node: ast.AST) -> None:
        self.error(node, "`with` is not allowed in rules")

    def visit_Try(self, node: ast.Try) -> _Visited:
        # The time-budget interrupt is a BaseException: it must not be caught
        # (bare except) nor delayed/swallowed (finally: while/return).
        if node.finalbody:
            self.error(node, "`try/finally` is not allowed in rules")
        for h in node.handlers:
            if h.type is None:
                self.error(
                    h,
                    "bare `except:` is not allowed; name the exceptions, "
                    "e.g. except (KeyError, TypeError):",
                )
                continue
            names = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
            for n in names:
                if not (isinstance(n, ast.Name) and n.id in CATCHABLE):
                    self.error(h, "`except` may only name: " + ", ".join(sorted(CATCHABLE)))
                    break
        return super().visit_Try(node)

    # -- functions ---------------------------------------------------------------
    def _check_args(self, node: ast.FunctionDef | ast.Lambda) -> None:
        a = node.args
        for arg in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg):
            if arg is not None:
                self._check_binding(node, arg.arg)
        for default in (*a.defaults, *(d for d in a.kw_defaults if d is not None)):
            if not _is_literal(default, mutable_ok=False):
                self.error(node, "default values must be constants (numbers, strings, tuples)")

    def _check_binding(self, node: ast.AST, name: str) -> None:
        if name in EXCEPTION_NAMES:
            self.error(node, f'"{name}" cannot be rebound')
        elif name in FORBIDDEN_NAMES:
            self.error(node, f'"{name}" is not allowed in rules')

    def visit_FunctionDef(self, node: ast.FunctionDef) -> _Visited:
        if node.decorator_list:
            self.error(node, "decorators are not allowed in rules")
        if node.name.startswith("_"):
            self.error(node, f'"{node.name}" is an invalid name because it starts with "_"')
        self._check_binding(node, node.name)
        self._check_args(node)
        return super().visit_FunctionDef(node)

    def visit_Lambda(self, node: ast.Lambda) -> _Visited:
        self._check_args(node)
        return super().visit_Lambda(node)

    # -- names and attributes -------------------------------------------------------
    def visit_Name(self, node: ast.Name) -> _Visited:
        if node.id in FORBIDDEN_NAMES:
            self.error(node, f'"{node.id}" is not allowed in rules')
            return node
        if not isinstance(node.ctx, ast.Load) and node.id in EXCEPTION_NAMES:
            self.error(node, f'"{node.id}" cannot be rebound')
        return super().visit_Name(node)

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> _Visited:
        if node.name:
            self._check_binding(node, node.name)
        return super().visit_ExceptHandler(node)

    def visit_Attribute(self, node: ast.Attribute) -> _Visited:
        attr = node.attr
        if attr in FORBIDDEN_ATTRS or attr.startswith(FORBIDDEN_ATTR_PREFIXES):
            self.error(node, f'attribute "{attr}" is not allowed in rules')
        if not isinstance(node.ctx, ast.Load):
            self.error(node, "setting or deleting attributes is not allowed in rules")
            return node
        new = super().visit_Attribute(node)  # name checks; returns _getattr_(value, attr)
        if attr in GUARDED_ATTRS or not isinstance(new, ast.Call):
            return new
        plain = ast.Attribute(value=new.args[0], attr=attr, ctx=ast.Load())
        copy_locations(plain, node)
        return plain

    def visit_Subscript(self, node: ast.Subscript) -> _Visited:
        if isinstance(node.ctx, ast.Load):
            return self.node_contents_visit(node)  # plain subscription
        if isinstance(node.slice, ast.Slice):
            self.error(node, "slice assignment is not allowed in rules")
        return super().visit_Subscript(node)  # _write_(value)[key] = ...

    # -- plain iteration/unpacking: nothing reachable needs _getiter_ ----------------
    def guard_iter(self, node: ast.AST) -> ast.AST:
        return self.node_contents_visit(node)

    def visit_Assign(self, node: ast.Assign) -> ast.AST:
        return self.node_contents_visit(node)

    def visit_Call(self, node: ast.Call) -> ast.AST:
        f = node.func
        if (
            isinstance(f, ast.Attribute)
            and f.attr in NULLARY_CALLS
            and not node.args
            and not node.keywords
        ):
            # s.lower() -> _lower_(s): the size check without a _getattr_ round trip
            call = ast.Call(
                func=ast.Name(f"_{f.attr}_", ast.Load()), args=[self.visit(f.value)], keywords=[]
            )
            copy_locations(call, node)
            return call
        node = self.node_contents_visit(node)  # *args/**kwargs need no _apply_
        self._guard_starred(node.args)  # but f(*a, *a, ...) builds one tuple
        return node

    # -- size guards --------------------------------------------------------------
    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        node = self.node_contents_visit(node)
        guard = _BINOP_GUARDS.get(type(node.op))
        if isinstance(node.op, ast.Add) and not (
            isinstance(node.left, ast.Constant) or isinstance(node.right, ast.Constant)
        ):
            guard = "_add_"  # x + 1, s + "!" grow by a constant; x + y may double
        if (
            isinstance(node.op, ast.Mod)
            and isinstance(node.left, ast.Constant)
            and isinstance(node.left.value, (int, float))
        ):
            guard = None  # 7 % x is arithmetic, never formatting
        if guard is None:
            return node
        call = ast.Call(func=ast.Name(guard, ast.Load()), args=[node.left, node.right], keywords=[])
        copy_locations(call, node)
        return call

    def visit_JoinedStr(self, node: ast.JoinedStr) -> ast.AST:
        # The values of one f-string are formatted one by one, then joined in one C
        # call: each of the k values gets MAX_STR / k (less what its constant
        # format spec may add), so the whole stays within MAX_STR.
        parts = [v for v in node.values if isinstance(v, ast.FormattedValue)]
        extra = sum(_spec_extra(v.format_spec) for v in parts)
        dynamic = [v for v in parts if not isinstance(v.value, ast.Constant)]
        if extra > MAX_STR // 2:
            self.error(node, f"f-string would exceed {MAX_STR:,} characters (format specs)")
        elif dynamic:
            limit = (MAX_STR - extra) // len(dynamic)
            for v in dynamic:
                setattr(v, _KV_LIMIT, limit)  # read by visit_FormattedValue
        return self.node_contents_visit(node)

    def visit_FormattedValue(self, node: ast.FormattedValue) -> ast.AST:
        spec = node.format_spec
        if spec is not None:
            if not (
                isinstance(spec, ast.JoinedStr)
                and all(isinstance(v, ast.Constant) for v in spec.values)
            ):
                self.error(node, "f-string format specs must be constant")
            else:
                text = _spec_text(spec)
                if _BIG_NUMBER.search(text):
                    self.error(node, "f-string width/precision must be a number up to 999")
                elif len(text) > MAX_SPEC_CHARS:
                    self.error(
                        node, f"f-string format specs must be at most {MAX_SPEC_CHARS} characters"
                    )
        limit = getattr(node, _KV_LIMIT, MAX_STR)
        node = self.node_contents_visit(node)
        if not isinstance(node.value, ast.Constant):
            mode = _CONVERSION_MODE.get(node.conversion, 2)
            args = [node.value]
            if mode or spec is not None or limit != MAX_STR:
                args += [ast.Constant(limit), ast.Constant(mode)]
            if spec is not None or mode:
                # The guard converts and formats (rules/guards.py render_guard).
                spec_text = _spec_text(spec) if isinstance(spec, ast.JoinedStr) else None
                args.append(ast.Constant(spec_text))
                node.conversion, node.format_spec = -1, None
            call = ast.Call(func=ast.Name("_render_", ast.Load()), args=args, keywords=[])
            copy_locations(call, node.value)
            node.value = call
        return node

    # -- unpacking: [*a, *a, ...] / f(*a, *a) build one list in C -----------------------
    @staticmethod
    def _guard_starred(elts: list[ast.expr]) -> None:
        starred = [e for e in elts if isinstance(e, ast.Starred)]
        if starred:
            limit = MAX_ITEMS // len(starred)
            for e in starred:
                call = ast.Call(
                    func=ast.Name("_unpack_", ast.Load()),
                    args=[e.value, ast.Constant(limit)],
                    keywords=[],
                )
                copy_locations(call, e.value)
                e.value = call

    def visit_List(self, node: ast.List | ast.Tuple) -> ast.AST:
        node = self.node_contents_visit(node)
        if isinstance(node.ctx, ast.Load):
            self._guard_starred(node.elts)
        return node

    visit_Tuple = visit_List

    def visit_Set(self, node: ast.Set) -> ast.AST:
        node = self.node_contents_visit(node)
        self._guard_starred(node.elts)
        return node


def _spec_text(spec: ast.JoinedStr) -> str:
    """The text of a format spec (its parts are constants and formatted values)."""
    return "".join(
        str(v.value) for v in spec.values if isinstance(v, ast.Constant | ast.FormattedValue)
    )


def _spec_extra(spec: ast.AST | None) -> int:
    """What a constant format spec can add to a value's text: its width and
    precision, a float's ~330 digits, 12 characters per character of a date's
    strftime spec (``%c``)."""
    if not isinstance(spec, ast.JoinedStr):
        return 0
    text = "".join(str(v.value) for v in spec.values if isinstance(v, ast.Constant))
    return 12 * len(text) + sum(int(d) for d in _NUMBER.findall(text) if len(d) < 4) + 340
