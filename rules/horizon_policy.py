"""The tracked compilation of a rule: :class:`TrackingPolicy` (see rules/horizon.py).

It is :class:`~rules.policy.RulePolicy` (same checks, same refusals, same guards)
plus one pass over the resulting tree, for the operations where CPython reads an
``int``/``date`` subclass in C without calling any of its methods:

1. **Taint analysis** (flow-insensitive, per function scope): which names and
   expressions may hold a tracked value. The sources are ``match``'s second
   parameter (``ctx``), the parameters of nested functions and lambdas, the
   parameters of module-level functions that some call site passes a tainted
   argument (all of them when the function is used as a value), and exception
   names. Taint flows through assignments, ``for`` targets, comprehensions, ``:=``,
   attributes, subscripts, operators, calls with a tainted argument or callee, and
   calls of nested functions. Comparisons give plain bools: never tainted.
2. **Rewrites**, only where a tainted value meets something that could read it
   silently:

   * ``a op b`` (comparison) with a tainted right operand and a left operand that
     is not an ``int``/``str`` constant (a float, a bool, a timedelta ... on the left
     is asked first and reads an int subclass in C): ``_tcmp_(a, "op", b)``; the
     same for ``x in y`` with a tainted ``x`` unless ``y`` is a literal (or
     module-constant) tuple/list/set of ints and strings, and for ``is``/``is not``
     (small ints are shared objects); a chain with such a pair becomes
     ``_tchain_(a, ops, lambda: b, ...)`` (lazy, like the chain);
   * ``a op b`` (operators the rule policy leaves plain: ``-``, ``/``, ``//``,
     ``>>``, ``&``, ``|``, ``^``, ``@``, ``+``/``%`` with a constant) with a tainted
     right operand and a left operand that is not an ``int``/``str`` constant:
     ``_tbin_(a, "op", b)`` (``*``, ``**``, ``<<``, ``%``, ``+`` already go through
     the size guards, wrapped in tracked mode);
   * a tainted index or slice bound: ``x[_touch_(i)]``;
   * a tainted argument of a call that is not known to be transparent (builtins
     that only pass values on or call their methods: ``len``, ``str``, ``list``,
     ``isinstance`` ..., the helpers, the guards, the rule's own functions):
     ``f(_touch_(arg))`` (``range``, ``round``, ``min``/``max``/``sorted``/``sum``,
     ``int(s, base)``, every method of a non-tracked object);
   * a tainted list/tuple receiving ``sort``/``index``/``count``/``remove`` (which
     compare its items in C): ``_touchr_(lst).sort()``.

   * a guard call of the rule policy (``_mul_``, ``_add_``, ``_mod_``, ``_pow_``,
     ``_lshift_``, ``_inplacevar_``, ``_render_``) with a tainted operand: its
     tracked twin (``_tmul_`` ...); helpers with a tracked variant called with
     untainted arguments only: the plain helper.

3. **Fusion** (the fast path, before the taint pass): a call of ``days_until``,
   ``days_since`` or ``age`` whose result is only compared with int constants
   (``<``, ``<=``, ``==`` ..., ``in`` a constant tuple, ``between`` with constant
   bounds, truthiness, ``is None``), directly or through a variable bound only to
   such calls, becomes ``_fdu_``/``_fds_``/``_fage_`` with those constants: a
   plain int that recorded its flips (rules/horizon.py, "The fast path"). For an
   age the variable may also be used otherwise: its next birthday is recorded.

A rule whose ``match`` never reads its ``ctx`` gets the module global
:data:`TIMELESS`: :class:`~rules.ruleset.RuleSet` runs its plain compilation and gives
it no horizon (nothing it computes depends on time) without touching the recorder.

A rule whose chain comparison holds an assignment expression in a later operand
cannot be made lazy this way: compiling it raises :class:`Untrackable`, and
:class:`~rules.ruleset.RuleSet` evaluates that rule untracked with the horizon
"tomorrow".
"""

from __future__ import annotations

import ast
import itertools
import operator
from collections.abc import Callable, Iterator
from typing import Any, cast

from rules.horizon import fused_age_thresholds, fused_thresholds
from rules.policy import RulePolicy

__all__ = ["TIMELESS", "TrackingPolicy", "Untrackable"]

TIMELESS = "_kv_timeless_"  # module global of a tracked rule that never reads ctx
_ENTRIES = ("match", "goal")  # the functions the evaluator calls with (profile, ctx)


class Untrackable(Exception):
    """The rule cannot be compiled in tracked mode (it still runs untracked)."""


# Builtins and helpers that never read a tracked value behind its back: they pass
# values on, or use only the value's own methods (str, bool, len, hash ...).
_TRANSPARENT = frozenset(
    {
        "isinstance",
        "len",
        "bool",
        "str",
        "list",
        "tuple",
        "set",
        "dict",
        "any",
        "all",
        "zip",
        "abs",
        "Exception",
        "KeyError",
        "IndexError",
        "LookupError",
        "TypeError",
        "ValueError",
        "AttributeError",
        "ZeroDivisionError",
        "ArithmeticError",
        "date",
        "days_until",
        "days_since",
        "age",
        "is_birthday",
        "month",
        "weekday",
        "add_days",
        "add_months",
        "between",
        "get",
        "has",
        "count",
        "any_of",
    }
)
# transparent with exactly one positional argument (int(s, base), enumerate(x, start): not)
_ONE_ARG = frozenset({"int", "float", "enumerate"})
_RECEIVER = frozenset({"sort", "index", "count", "remove"})
# guards with a tracked twin, for calls where an operand may be tracked
_TRACKED_GUARD = {
    "_mul_": "_tmul_",
    "_pow_": "_tpow_",
    "_lshift_": "_tlshift_",
    "_add_": "_tadd_",
    "_mod_": "_tmod_",
    "_inplacevar_": "_tinplacevar_",
    "_render_": "_trender_",
}
# helpers with a tracked variant, and their plain version for untainted arguments
_PLAIN_HELPER = {
    "add_days": "_padd_days_",
    "add_months": "_padd_months_",
    "between": "_pbetween_",
    "any_of": "_pany_of_",
}
_CMP_NAMES = {
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.In: "in",
    ast.NotIn: "not in",
    ast.Is: "is",
    ast.IsNot: "is not",
}
_BIN_NAMES = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.BitAnd: "&",
    ast.MatMult: "@",
}
_FUNCS = (ast.FunctionDef, ast.Lambda)
# what an operand evaluated ahead of need (speculation, see visit_BoolOp) may contain
_PURE_NODES = (
    ast.Constant, ast.Name, ast.Attribute, ast.Subscript, ast.Slice, ast.Tuple, ast.List,
    ast.Set, ast.Dict, ast.Compare, ast.BoolOp, ast.UnaryOp, ast.BinOp, ast.IfExp, ast.Call,
    ast.keyword, ast.JoinedStr, ast.FormattedValue, ast.expr_context, ast.boolop,
    ast.operator, ast.unaryop, ast.cmpop,
)  # fmt: skip
# builtins, helpers and guards without side effects and with a cost bounded by the
# sizes of their arguments (which the size guards bound)
_PURE_CALLS = frozenset(
    {
        "len", "abs", "min", "max", "bool", "int", "float", "str", "round", "isinstance",
        "get", "has", "count", "any_of", "between", "days_until", "days_since", "age",
        "is_birthday", "month", "weekday", "add_days", "add_months", "date",
        "_getattr_", "_mul_", "_pow_", "_lshift_", "_add_", "_mod_", "_render_",
        "_upper_", "_lower_", "_casefold_",
    }
)  # fmt: skip
_PURE_METHODS = frozenset(
    {
        "get", "startswith", "endswith", "lower", "upper", "casefold", "strip", "lstrip",
        "rstrip", "isdigit", "isalpha", "isalnum", "weekday", "isoweekday", "toordinal",
        "isoformat", "date", "keys", "values", "items",
    }
)  # fmt: skip
_SITES = itertools.count(1)  # call sites of fused_field: keys of its per-context cache
_FUSED = {"days_until": "_fdu_", "days_since": "_fds_", "age": "_fage_"}
# comparisons that flip at the same offset share one threshold
_CANON = {"<": "<", ">=": "<", "<=": "<=", ">": "<=", "==": "==", "!=": "=="}
_SWAP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}


class _Scope:
    __slots__ = ("assigned", "defs", "locals", "node", "parent", "plain", "tainted")

    def __init__(self, node: ast.AST | None, parent: _Scope | None) -> None:
        self.node = node
        self.parent = parent
        self.locals: set[str] = set()
        self.tainted: set[str] = set()
        self.defs: set[str] = set()  # names bound by ``def`` (and nothing else: see collect)
        self.assigned: set[str] = set()
        self.plain: set[str] = set()  # fused helper results (plain ints): never tracked


def _names(target: ast.AST) -> Iterator[str]:
    for n in ast.walk(target):
        if isinstance(n, ast.Name):
            yield n.id


_FOLD: dict[Any, Callable[[int, int], int]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    "_mul_": operator.mul,
    "_add_": operator.add,
}


def _fold(node: ast.AST) -> int | None:
    """The value of an int constant expression (``-7``, ``365 * 25``), else None."""
    if isinstance(node, ast.Constant):
        return node.value if type(node.value) is int else None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Invert)):
        v = _fold(node.operand)
        if v is None:
            return None
        return -v if isinstance(node.op, ast.USub) else ~v if isinstance(node.op, ast.Invert) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _FOLD:
        a, b = _fold(node.left), _fold(node.right)
        fn = _FOLD[type(node.op)]
    elif (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _FOLD
        and len(node.args) == 2
        and not node.keywords
    ):
        a, b = _fold(node.args[0]), _fold(node.args[1])
        fn = _FOLD[node.func.id]
    else:
        return None
    if a is None or b is None or abs(a) > 1 << 40 or abs(b) > 1 << 40:
        return None
    return fn(a, b)


def _int_constant(node: ast.AST) -> bool:
    return _fold(node) is not None


def _int_value(node: ast.AST) -> int:
    v = _fold(node)
    assert v is not None
    return v


def _safe_constant(node: ast.AST) -> bool:
    """An int or str constant: never reads an int/date subclass silently."""
    return _int_constant(node) or isinstance(node, ast.Constant) and type(node.value) is str


def _safe_items(value: Any) -> bool:
    return isinstance(value, (tuple, list, set, frozenset)) and all(
        type(v) in (int, str) for v in value
    )


# Helpers whose result is an int, a date, None or a tracked int/date: safe on the
# left of an operator (an int or a date is asked after a subclass of it on the right).
_SAFE_LEFT_CALLS = frozenset(
    {
        "month",
        "weekday",
        "days_until",
        "days_since",
        "age",
        "count",
        "len",
        "date",
        "add_days",
        "add_months",
    }
)
# Builtins and helpers whose result is never a tracked value.
_PLAIN_RESULT = frozenset(
    {
        "add_months",
        "is_birthday",
        "between",
        "any_of",
        "has",
        "count",
        "isinstance",
        "len",
        "bool",
        "str",
        "int",
        "float",
        "any",
        "all",
    }
)


class _Tracker:
    def __init__(self, module: ast.Module) -> None:
        self.module = module
        self.root = _Scope(None, None)
        self.scope_of: dict[int, _Scope] = {}  # FunctionDef/Lambda id -> its scope
        self.sites: list[tuple[_Scope, ast.AST, ast.AST | None, bool]] = []  # target <- value
        self.scope_at: dict[int, _Scope] = {}  # Name load -> the scope it is read in
        self.field_scope: dict[int, _Scope] = {}  # attribute reads and calls -> their scope
        self.parents: dict[int, ast.AST] = {}
        self.constants: dict[str, Any] = {}
        self.module_defs: dict[str, ast.FunctionDef] = {}
        self.calls: list[tuple[_Scope, ast.Call]] = []
        self.def_as_value: set[str] = set()
        self.tainted_params: dict[str, set[int | str]] = {}
        # the rule catches exceptions somewhere (no speculative and/or: visit_BoolOp)
        self.catches = any(isinstance(n, (ast.Try, ast.TryStar)) for n in ast.walk(module))

    # -- pass 1: scopes and binding sites ----------------------------------------------
    def collect(self) -> None:
        for stmt in self.module.body:
            if isinstance(stmt, ast.Assign) and all(isinstance(t, ast.Name) for t in stmt.targets):
                try:
                    value = ast.literal_eval(stmt.value)
                except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                    continue
                for t in stmt.targets:
                    assert isinstance(t, ast.Name)
                    self.constants[t.id] = value
            elif isinstance(stmt, ast.FunctionDef):
                self.module_defs[stmt.name] = stmt
        self._walk(self.module, self.root)
        for scope in (self.root, *self.scope_of.values()):
            scope.defs -= scope.assigned
        for name in list(self.module_defs):
            if name not in self.root.defs:
                del self.module_defs[name]  # also bound otherwise: not a known function

    def _walk(self, node: ast.AST, scope: _Scope) -> None:
        for child in ast.iter_child_nodes(node):
            self._visit(child, scope)

    def _visit(self, node: ast.AST, scope: _Scope) -> None:
        if isinstance(node, ast.FunctionDef):
            scope.locals.add(node.name)
            scope.defs.add(node.name)
            for d in node.args.defaults + [d for d in node.args.kw_defaults if d]:
                self._visit(d, scope)
            inner = self._new_scope(node, scope)
            for stmt in node.body:
                self._visit(stmt, inner)
            return
        if isinstance(node, ast.Lambda):
            for d in node.args.defaults + [d for d in node.args.kw_defaults if d]:
                self._visit(d, scope)
            inner = self._new_scope(node, scope)
            self._visit(node.body, inner)
            return
        if isinstance(node, ast.Assign):
            simple = len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
            for t in node.targets:
                self._bind(scope, t, node.value, simple)
        elif isinstance(node, ast.AnnAssign):
            self._bind(scope, node.target, node.value)
        elif isinstance(node, ast.AugAssign):
            self._bind(scope, node.target, node.value)
        elif isinstance(node, ast.NamedExpr):
            self._bind(scope, node.target, node.value)
        elif isinstance(node, (ast.For, ast.comprehension)):
            self._bind(scope, node.target, node.iter)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            scope.locals.add(node.name)
            scope.assigned.add(node.name)
            scope.tainted.add(node.name)
        elif isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            scope.locals.add(node.id)
            scope.assigned.add(node.id)
        elif isinstance(node, ast.Call):
            self.calls.append((scope, node))
            if isinstance(node.func, ast.Name):
                node.func.kv_callee = True  # type: ignore[attr-defined]
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            self.scope_at[id(node)] = scope
            self._note_value_use(node, scope)
        elif isinstance(node, (ast.Attribute, ast.Call)):
            self.field_scope[id(node)] = scope
        self._walk(node, scope)

    def _note_value_use(self, node: ast.Name, scope: _Scope) -> None:
        # a module-level def used other than as a callee: every parameter may be tainted
        if node.id in self.module_defs and self._resolve(scope, node.id) is None:
            if not getattr(node, "kv_callee", False):
                self.def_as_value.add(node.id)

    def _new_scope(self, node: ast.FunctionDef | ast.Lambda, parent: _Scope) -> _Scope:
        inner = _Scope(node, parent)
        self.scope_of[id(node)] = inner
        a = node.args
        params = [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]
        for p in params:
            if p is not None:
                inner.locals.add(p.arg)
        return inner

    def _bind(
        self, scope: _Scope, target: ast.AST, value: ast.AST | None, simple: bool = False
    ) -> None:
        for name in _names(target):
            scope.locals.add(name)
            scope.assigned.add(name)
        self.sites.append((scope, target, value, simple))

    # -- pass 1b: the fast path (fused helpers) -------------------------------------------
    def _helper(self, call: ast.AST, scope: _Scope) -> str | None:
        """``days_until``/``days_since``/``age`` called plainly with two arguments."""
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
            return None
        name = call.func.id
        if name not in _FUSED or name in self.module_defs or name in self.constants:
            return None
        if self._resolve(scope, name) is not None:
            return None
        if (
            len(call.args) != 2
            or call.keywords
            or any(isinstance(a, ast.Starred) for a in call.args)
        ):
            return None
        return name

    def _uses(self, node: ast.AST, scope: _Scope) -> list[tuple[str, int]] | None:
        """The thresholds ``node``'s value is compared with, or None: used otherwise."""
        parent = self.parents.get(id(node))
        if isinstance(parent, (ast.If, ast.While, ast.IfExp)) and parent.test is node:
            return [("==", 0)]  # truthiness
        if isinstance(parent, ast.UnaryOp) and isinstance(parent.op, ast.Not):
            return [("==", 0)]
        if isinstance(parent, ast.Call):
            f = parent.func
            if (
                isinstance(f, ast.Name)
                and f.id == "between"
                and self.builtin(f.id, scope)
                and len(parent.args) == 3
                and not parent.keywords
                and parent.args[0] is node
                and _int_constant(parent.args[1])
                and _int_constant(parent.args[2])
            ):
                return [("<", _int_value(parent.args[1])), ("<=", _int_value(parent.args[2]))]
            return None
        if not isinstance(parent, ast.Compare):
            return None
        operands = [parent.left, *parent.comparators]
        idx = next(i for i, o in enumerate(operands) if o is node)
        out: list[tuple[str, int]] = []
        for i, op in enumerate(parent.ops):
            if i != idx and i + 1 != idx:
                continue
            other = operands[i + 1] if i == idx else operands[i]
            left = i == idx
            if isinstance(op, (ast.Is, ast.IsNot)):
                if isinstance(other, ast.Constant) and type(other.value) is not int:
                    continue  # is None: time-independent
                return None
            if isinstance(op, (ast.In, ast.NotIn)):
                if not left or not self.safe_container(other, scope):
                    return None
                values = (
                    [_int_value(e) for e in other.elts if _int_constant(e)]
                    if isinstance(other, (ast.Tuple, ast.List, ast.Set))
                    else [v for v in self.constants[other.id] if type(v) is int]  # type: ignore[attr-defined]
                )
                out += [("==", v) for v in values]
                continue
            if not _int_constant(other):
                return None
            name = _CMP_NAMES[type(op)]
            out.append((_CANON[name if left else _SWAP[name]], _int_value(other)))
        return out

    def fuse(self) -> None:
        for node in ast.walk(self.module):
            for child in ast.iter_child_nodes(node):
                self.parents[id(child)] = node
        # variables bound only to helper results: v = days_until(x, ctx)
        by_var: dict[tuple[int, str], list[tuple[ast.Call, str]]] = {}
        spoiled: set[tuple[int, str]] = set()
        for scope, target, value, simple in self.sites:
            for name in _names(target):
                key = (id(scope), name)
                kind = self._helper(value, scope) if simple and value is not None else None
                if kind is None:
                    spoiled.add(key)
                else:
                    assert isinstance(value, ast.Call)
                    by_var.setdefault(key, []).append((value, kind))
        loads: dict[tuple[int, str], list[ast.Name]] = {}
        nested: set[tuple[int, str]] = set()  # read from a nested function: anything
        for node in ast.walk(self.module):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                sc = self.scope_at.get(id(node))
                owner = None if sc is None else self._resolve(sc, node.id)
                if owner is not None:
                    loads.setdefault((id(owner), node.id), []).append(node)
                    if owner is not sc:
                        nested.add((id(owner), node.id))
        scopes = {id(sc): sc for sc in self.scope_of.values()}
        for key, calls in by_var.items():
            sc = scopes.get(key[0])
            if key in spoiled or sc is None or key[1] in sc.tainted or key[1] in sc.defs:
                continue  # bound otherwise too, or an exception name
            if key[1] in self._params(sc.node):
                continue
            thr: list[tuple[str, int]] = []
            opaque = key in nested
            for name_node in loads.get(key, []):
                u = self._uses(name_node, self.scope_at[id(name_node)])
                if u is None:
                    opaque = True
                else:
                    thr += u
            if opaque and any(kind != "age" for _, kind in calls):
                continue
            fused = tuple(sorted(set(thr)))
            for call, kind in calls:
                call.kv_fuse = (kind, fused, opaque)  # type: ignore[attr-defined]
            sc.plain.add(key[1])
        # helper results compared directly: days_until(x, ctx) == 60
        for scope, call in self.calls:
            if getattr(call, "kv_fuse", None) is not None:
                continue
            kind = self._helper(call, scope)
            if kind is None:
                continue
            u = self._uses(call, scope)
            if u is not None:
                call.kv_fuse = (kind, tuple(sorted(set(u))), False)  # type: ignore[attr-defined]

    def _field(self, node: ast.AST, scope: _Scope) -> tuple[ast.expr, str] | None:
        """``d.month``-like reads of a calendar field of a tainted ``d``: (d, field)."""
        if isinstance(node, ast.Attribute) and node.attr in ("year", "month", "day"):
            d = node.value
            field = node.attr
        elif (
            isinstance(node, ast.Call)
            and not node.args
            and not node.keywords
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("weekday", "isoweekday")
        ):
            d, field = node.func.value, node.func.attr
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("weekday", "month")
            and self.builtin(node.func.id, scope)
            and len(node.args) == 1
            and not isinstance(node.args[0], ast.Starred)
            and not node.keywords
        ):
            d, field = node.args[0], "h:" + node.func.id
        else:
            return None
        return (d, field) if self.tainted_expr(d, scope) else None

    def fuse_fields(self) -> None:
        """``ctx.today.month == 11``, ``weekday(ctx.today) == 5``, ``x == ctx.today.month``:
        one call, kept per context (rules/horizon.py :func:`fused_field`)."""
        for node in ast.walk(self.module):
            scope = self.field_scope.get(id(node))
            if scope is None:
                continue
            found = self._field(node, scope)
            if found is None:
                continue
            thr = self._uses(node, scope)
            if thr is not None:
                node.kv_field = (*found, tuple(sorted(set(thr))))  # type: ignore[attr-defined]
                continue
            parent = self.parents.get(id(node))
            if (
                isinstance(parent, ast.Compare)
                and len(parent.ops) == 1
                and not isinstance(parent.ops[0], (ast.In, ast.NotIn, ast.Is, ast.IsNot))
            ):
                other = parent.comparators[0] if parent.left is node else parent.left
                if not self.tainted_expr(other, scope):
                    parent.kv_fcmp = (*found, parent.left is node)  # type: ignore[attr-defined]

    # -- pass 2: taint ---------------------------------------------------------------------
    def _resolve(self, scope: _Scope, name: str) -> _Scope | None:
        s: _Scope | None = scope
        while s is not None and s is not self.root:
            if name in s.locals:
                return s
            s = s.parent
        return None

    def taint(self) -> None:
        for scope in self.scope_of.values():
            node = scope.node
            params = self._params(node)
            if isinstance(node, ast.FunctionDef) and scope.parent is self.root:
                if node.name in self.def_as_value:
                    scope.tainted |= set(params)
                elif node.name in _ENTRIES and len(params) >= 2:
                    scope.tainted.add(params[1])
            else:
                scope.tainted |= set(params)
        for name in self.def_as_value:
            self.tainted_params.setdefault(name, set())
        changed = True
        while changed:
            changed = False
            for scope, target, value, _simple in self.sites:
                if value is None or self.tainted_expr(value, scope):
                    names = set(_names(target)) - scope.tainted
                    if names:
                        scope.tainted |= names
                        changed = True
            for scope, call in self.calls:
                changed |= self._taint_params(scope, call)

    @staticmethod
    def _params(node: ast.AST | None) -> list[str]:
        if not isinstance(node, _FUNCS):
            return []
        a = node.args
        return [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if p]

    def _taint_params(self, scope: _Scope, call: ast.Call) -> bool:
        f = call.func
        if not (isinstance(f, ast.Name) and f.id in self.module_defs):
            return False
        if self._resolve(scope, f.id) is not None:
            return False
        fdef = self.module_defs[f.id]
        inner = self.scope_of[id(fdef)]
        params = self._params(fdef)
        new: set[str] = set()
        positional = [p.arg for p in (*fdef.args.posonlyargs, *fdef.args.args)]
        for i, arg in enumerate(call.args):
            if isinstance(arg, ast.Starred):
                if self.tainted_expr(arg.value, scope):
                    new |= set(params)
                continue
            if self.tainted_expr(arg, scope):
                if i < len(positional):
                    new.add(positional[i])
                elif fdef.args.vararg:
                    new.add(fdef.args.vararg.arg)
        for kw in call.keywords:
            if self.tainted_expr(kw.value, scope):
                if kw.arg is None:
                    new |= set(params)
                elif kw.arg in params:
                    new.add(kw.arg)
                elif fdef.args.kwarg:
                    new.add(fdef.args.kwarg.arg)
        new -= inner.tainted
        if new:
            inner.tainted |= new
            return True
        return False

    def tainted_expr(self, e: ast.AST | None, scope: _Scope) -> bool:  # noqa: C901 - a table
        if e is None or isinstance(e, (ast.Constant, ast.Compare, ast.JoinedStr)):
            return False
        if isinstance(e, ast.Name):
            s = self._resolve(scope, e.id)
            return s is not None and e.id in s.tainted and e.id not in s.plain
        if isinstance(e, (ast.Attribute, ast.Subscript, ast.Starred)):
            return self.tainted_expr(e.value, scope)
        if isinstance(e, ast.Call):
            if getattr(e, "kv_fuse", None) is not None:
                return False  # a fused helper: a plain int
            f = e.func
            if isinstance(f, ast.Name):
                s = self._resolve(scope, f.id)
                if s is not None:
                    return True  # a local function or value: anything
                if f.id in _PLAIN_RESULT and f.id not in self.module_defs:
                    return False
            elif self.tainted_expr(f, scope):
                return True
            return any(self.tainted_expr(a, scope) for a in e.args) or any(
                self.tainted_expr(k.value, scope) for k in e.keywords
            )
        if isinstance(e, ast.BinOp):
            return self.tainted_expr(e.left, scope) or self.tainted_expr(e.right, scope)
        if isinstance(e, ast.UnaryOp):
            return not isinstance(e.op, ast.Not) and self.tainted_expr(e.operand, scope)
        if isinstance(e, ast.BoolOp):
            return any(self.tainted_expr(v, scope) for v in e.values)
        if isinstance(e, ast.IfExp):
            return self.tainted_expr(e.body, scope) or self.tainted_expr(e.orelse, scope)
        if isinstance(e, (ast.List, ast.Tuple, ast.Set)):
            return any(self.tainted_expr(v, scope) for v in e.elts)
        if isinstance(e, ast.Dict):
            return any(self.tainted_expr(v, scope) for v in (*e.keys, *e.values) if v)
        if isinstance(e, (ast.ListComp, ast.SetComp, ast.GeneratorExp)):
            return self.tainted_expr(e.elt, scope)
        if isinstance(e, ast.DictComp):
            return self.tainted_expr(e.key, scope) or self.tainted_expr(e.value, scope)
        if isinstance(e, ast.NamedExpr):
            return self.tainted_expr(e.value, scope)
        if isinstance(e, ast.Slice):
            return any(self.tainted_expr(v, scope) for v in (e.lower, e.upper, e.step))
        if isinstance(e, ast.Lambda):
            inner = self.scope_of.get(id(e), scope)
            own = set(self._params(e))
            return any(
                isinstance(n, ast.Name) and n.id not in own and self.tainted_expr(n, inner)
                for n in ast.walk(e.body)
            )
        return True  # anything else: assume the worst

    # -- pass 3: rewrites ---------------------------------------------------------------------
    def rewrite(self) -> None:
        self.mark_truth()
        _Rewriter(self).visit(self.module)
        ast.fix_missing_locations(self.module)

    def mark_truth(self) -> None:
        """Mark (``kv_truth``) the expressions whose value is only ever tested for truth:
        the tests of ``if``/``while``/``x if t else y``/comprehension filters, the
        operand of ``not``, what ``match`` returns (when nothing but the evaluator calls
        it: the evaluator asks only whether it is true), and, inside those, the operands
        of ``and``/``or`` and the branches of ``x if t else y``."""
        roots: list[ast.AST] = []
        for node in ast.walk(self.module):
            if isinstance(node, (ast.If, ast.While, ast.IfExp)):
                roots.append(node.test)
            elif isinstance(node, ast.comprehension):
                roots += node.ifs
            elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
                roots.append(node.operand)
        for entry in _ENTRIES:  # match and the goal (rules/goals.py) answer yes/no
            fdef = self.module_defs.get(entry)
            if fdef is None or any(
                isinstance(n, ast.Name) and n.id == entry for n in ast.walk(self.module)
            ):
                continue
            stack: list[ast.AST] = list(fdef.body)
            while stack:  # the entry's own returns, not those of functions defined inside it
                n = stack.pop()
                if isinstance(n, ast.Return) and n.value is not None:
                    roots.append(n.value)
                elif not isinstance(n, (*_FUNCS, ast.expr)):
                    stack += ast.iter_child_nodes(n)
        while roots:
            e = roots.pop()
            e.kv_truth = True  # type: ignore[attr-defined]
            if isinstance(e, ast.BoolOp):
                roots += e.values
            elif isinstance(e, ast.IfExp):
                roots += (e.body, e.orelse)

    def timed(self, e: ast.AST, scope: _Scope) -> bool:
        """``e`` may read the evaluation date (a tracked value or a fused helper)."""
        for n in ast.walk(e):
            if isinstance(n, ast.Name) and self.tainted_expr(n, scope):
                return True
            if any(getattr(n, a, None) is not None for a in ("kv_fuse", "kv_field", "kv_fcmp")):
                return True
        return False

    def pure(self, e: ast.AST, scope: _Scope) -> bool:
        """``e`` can be evaluated ahead of need: no side effect, no loop, no function of
        the rule's own, only builtins and helpers whose cost is bounded by their
        arguments' sizes (which the size guards bound)."""
        for n in ast.walk(e):
            if not isinstance(n, _PURE_NODES):
                return False
            if isinstance(n, ast.Call):
                f = n.func
                if isinstance(f, ast.Name):
                    if f.id not in _PURE_CALLS or not self.builtin(f.id, scope):
                        return False
                    if f.id == "_getattr_" and not (
                        len(n.args) == 2
                        and isinstance(n.args[1], ast.Constant)
                        and isinstance(n.args[1].value, str)
                    ):
                        return False
                elif isinstance(f, ast.Attribute):
                    if f.attr not in _PURE_METHODS:
                        return False
                elif not (
                    isinstance(f, ast.Call)
                    and isinstance(f.func, ast.Name)
                    and f.func.id == "_getattr_"
                    and len(f.args) == 2
                    and isinstance(f.args[1], ast.Constant)
                    and f.args[1].value in _PURE_METHODS
                ):
                    return False
        return True

    def transparent(self, call: ast.Call, scope: _Scope) -> bool:
        f = call.func
        if not isinstance(f, ast.Name):
            return False
        if self._resolve(scope, f.id) is not None:
            s = self._resolve(scope, f.id)
            return s is not None and f.id in s.defs  # a nested def: instrumented code
        if f.id in self.module_defs:
            return True
        if f.id in self.constants:
            return False
        if f.id.startswith("_"):
            return True  # the guards (they handle tracked values)
        if f.id in _TRANSPARENT:
            return True
        if f.id in _ONE_ARG:
            return (
                len(call.args) == 1
                and not isinstance(call.args[0], ast.Starred)
                and not call.keywords
            )
        return False

    def timeless(self) -> bool:
        """``match`` — and the goal, where the rule has one (rules/goals.py) — never
        reads its ``ctx`` (so nothing it computes depends on time)."""
        if self.module_defs.get("match") is None:
            return False
        for entry in _ENTRIES:
            fdef = self.module_defs.get(entry)
            if fdef is None:
                continue
            scope = self.scope_of[id(fdef)]
            params = self._params(fdef)
            if len(params) < 2 or entry in self.def_as_value:
                return False
            ctx = params[1]
            for node in ast.walk(self.module):
                if isinstance(node, ast.Name) and node.id == ctx:
                    sc = self.scope_at.get(id(node))
                    if sc is None or self._resolve(sc, ctx) is scope:
                        return False
        return True

    def builtin(self, name: str, scope: _Scope) -> bool:
        """``name`` is the sandbox's builtin (a guard or helper), not a rule's own."""
        return (
            name not in self.module_defs
            and name not in self.constants
            and self._resolve(scope, name) is None
        )

    def safe_left(self, node: ast.AST, scope: _Scope) -> bool:
        """A left operand that cannot read an int/date subclass on the right silently."""
        if _safe_constant(node):
            return True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            name = node.func.id
            return (
                name in _SAFE_LEFT_CALLS
                and name not in self.module_defs
                and name not in self.constants
                and self._resolve(scope, name) is None
            )
        return False

    def safe_container(self, node: ast.AST, scope: _Scope) -> bool:
        """A literal (or module-constant, not shadowed) tuple/list/set of ints and strings."""
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return all(_safe_constant(e) for e in node.elts)
        if (
            isinstance(node, ast.Name)
            and node.id in self.constants
            and self._resolve(scope, node.id) is None
        ):
            return _safe_items(self.constants[node.id])
        return False


def _no_args() -> ast.arguments:
    return ast.arguments(
        posonlyargs=[], args=[], vararg=None, kwonlyargs=[], kw_defaults=[], kwarg=None, defaults=[]
    )


def _call(name: str, *args: ast.expr) -> ast.Call:
    return ast.Call(func=ast.Name(name, ast.Load()), args=list(args), keywords=[])


def _touch(node: ast.expr) -> ast.expr:
    new = _call("_touch_", node)
    ast.copy_location(new, node)
    return new


class _Rewriter(ast.NodeTransformer):
    def __init__(self, tracker: _Tracker) -> None:
        self.t = tracker
        self.scope = tracker.root

    def _in(self, node: ast.AST) -> ast.AST:
        saved = self.scope
        self.scope = self.t.scope_of[id(node)]
        try:
            return self.generic_visit(node)
        finally:
            self.scope = saved

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        node.args = self.visit(node.args)
        node.decorator_list = [self.visit(d) for d in node.decorator_list]
        saved = self.scope
        self.scope = self.t.scope_of[id(node)]
        try:
            node.body = [self.visit(s) for s in node.body]
        finally:
            self.scope = saved
        return node

    def visit_Lambda(self, node: ast.Lambda) -> ast.AST:
        node.args = self.visit(node.args)
        saved = self.scope
        self.scope = self.t.scope_of[id(node)]
        try:
            node.body = self.visit(node.body)
        finally:
            self.scope = saved
        return node

    def tainted(self, e: ast.AST | None) -> bool:
        return self.t.tainted_expr(e, self.scope)

    # calendar fields (fused_field) -------------------------------------------------------------
    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        field = getattr(node, "kv_field", None)
        node = self.generic_visit(node)  # type: ignore[assignment]
        if field is None:
            return node
        return self._field_call(node.value, field)

    def _field_call(self, d: ast.expr, field: tuple[Any, ...]) -> ast.expr:
        _, name, thr = field
        return _call(
            "_ffield_", d, ast.Constant(name), ast.Constant(next(_SITES)), ast.Constant(thr)
        )

    # comparisons ---------------------------------------------------------------------------
    def _needs(self, left: ast.expr, op: ast.cmpop, right: ast.expr) -> bool:
        if isinstance(op, (ast.In, ast.NotIn)):
            return self.tainted(left) and not self.t.safe_container(right, self.scope)
        if isinstance(op, (ast.Is, ast.IsNot)):
            if not (self.tainted(left) or self.tainted(right)):
                return False
            for side in (left, right):
                if isinstance(side, ast.Constant) and type(side.value) is not int:
                    return False
            return True
        return self.tainted(right) and not self.t.safe_left(left, self.scope)

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        fcmp = getattr(node, "kv_fcmp", None)
        if fcmp is not None:
            # x == ctx.today.month: the field's comparison, kept per context and x
            node = self.generic_visit(node)  # type: ignore[assignment]
            _, name, left = fcmp
            fnode, other = (node.left, node.comparators[0])
            if not left:
                fnode, other = other, fnode
            d = (
                fnode.value
                if isinstance(fnode, ast.Attribute)
                else fnode.args[0]  # type: ignore[attr-defined]
                if name.startswith("h:")
                else fnode.func.value  # type: ignore[attr-defined]
            )
            new = _call(
                "_ffcmp_",
                d,
                ast.Constant(name),
                ast.Constant(next(_SITES)),
                ast.Constant(_CMP_NAMES[type(node.ops[0])]),
                other,
                ast.Constant(left),
            )
            return ast.copy_location(new, node)
        # decide on the original operands (taint is structural), then rewrite inside
        operands = [node.left, *node.comparators]
        need = [self._needs(operands[i], op, operands[i + 1]) for i, op in enumerate(node.ops)]
        node = self.generic_visit(node)  # type: ignore[assignment]
        if not any(need):
            return node
        names = tuple(_CMP_NAMES[type(op)] for op in node.ops)
        if len(node.ops) == 1:
            new = _call("_tcmp_", node.left, ast.Constant(names[0]), node.comparators[0])
        else:
            for c in node.comparators:
                if any(isinstance(n, ast.NamedExpr) for n in ast.walk(c)):
                    raise Untrackable("a chained comparison assigns (:=) in an operand")
            new = _call(
                "_tchain_",
                node.left,
                ast.Tuple([ast.Constant(n) for n in names], ast.Load()),
                *(ast.Lambda(args=_no_args(), body=c) for c in node.comparators),
            )
        return ast.copy_location(new, node)

    # and / or whose value is only tested for truth ----------------------------------------------
    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        """``p and a and b and c`` tested for truth, with ``a`` the first operand that
        may read the date and ``b``, ``c`` pure (:meth:`_Tracker.pure`), becomes
        ``p and _tand_(_topen_(), a, lambda: b and c)`` (``or``: ``_tor_``): the same
        answer and evaluation order, and when ``a`` decides the answer early the rest
        runs anyway, so the horizon is the latest of the operands that decide it
        (rules/horizon.py, :func:`~rules.horizon.boolop`), not only ``a``'s:
        ``weekday(ctx.today) == 5 and get(profile, "region") == 77`` sleeps for good
        for a profile outside region 77, not until Saturday. Not in a rule that
        catches exceptions: ``a`` runs in its own recording window, which an exception
        caught inside the rule would leave open (uncaught, the rule wakes tomorrow)."""
        values = node.values
        t = next((i for i, v in enumerate(values[:-1]) if self.t.timed(v, self.scope)), None)
        if (
            t is None
            or not getattr(node, "kv_truth", False)
            or self.t.catches
            or not all(self.t.pure(v, self.scope) for v in values[t + 1 :])
        ):
            return self.generic_visit(node)
        rest: ast.expr = values[-1]
        if len(values) - t > 2:
            rest = ast.copy_location(ast.BoolOp(op=node.op, values=values[t + 1 :]), node)
            rest.kv_truth = True  # type: ignore[attr-defined]
        first = cast(ast.expr, self.visit(values[t]))
        rest = cast(ast.expr, self.visit(rest))
        name = "_tand_" if isinstance(node.op, ast.And) else "_tor_"
        call = ast.copy_location(
            _call(name, _call("_topen_"), first, ast.Lambda(args=_no_args(), body=rest)), node
        )
        if t == 0:
            return call
        node.values = [cast(ast.expr, self.visit(v)) for v in values[:t]] + [call]
        return node

    # operators the rule policy left plain ----------------------------------------------------
    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        need = self.tainted(node.right) and not self.t.safe_left(node.left, self.scope)
        node = self.generic_visit(node)  # type: ignore[assignment]
        if not need:
            return node
        new = _call("_tbin_", node.left, ast.Constant(_BIN_NAMES[type(node.op)]), node.right)
        return ast.copy_location(new, node)

    # indexes -------------------------------------------------------------------------------
    def visit_Subscript(self, node: ast.Subscript) -> ast.AST:
        sl = node.slice
        if isinstance(sl, ast.Slice):
            parts = {k: self.tainted(getattr(sl, k)) for k in ("lower", "upper", "step")}
            node = self.generic_visit(node)  # type: ignore[assignment]
            sl = node.slice
            assert isinstance(sl, ast.Slice)
            for k, bad in parts.items():
                if bad:
                    setattr(sl, k, _touch(getattr(sl, k)))
            return node
        bad = self.tainted(sl)
        node = self.generic_visit(node)  # type: ignore[assignment]
        if bad:
            node.slice = _touch(node.slice)
        return node

    # calls ---------------------------------------------------------------------------------
    def visit_Call(self, node: ast.Call) -> ast.AST:
        field = getattr(node, "kv_field", None)
        if field is not None:
            node = self.generic_visit(node)  # type: ignore[assignment]
            d = node.args[0] if field[1].startswith("h:") else node.func.value  # type: ignore[attr-defined]
            return ast.copy_location(self._field_call(d, field), node)
        fuse = getattr(node, "kv_fuse", None)
        if fuse is not None:
            node = self.generic_visit(node)  # type: ignore[assignment]
            kind, thr, opaque = fuse
            node.func = ast.Name(_FUSED[kind], ast.Load())
            if kind == "age":
                ages = fused_age_thresholds(thr)
                node.args += [ast.Constant(cast(Any, ages)), ast.Constant(opaque)]
            else:
                node.args.append(ast.Constant(cast(Any, fused_thresholds(kind, thr))))
            return node
        transparent = self.t.transparent(node, self.scope)
        args = [self.tainted(a) for a in node.args]
        kws = [self.tainted(k.value) for k in node.keywords]
        f = node.func
        if isinstance(f, ast.Name) and self.t.builtin(f.id, self.scope):
            twin = _TRACKED_GUARD.get(f.id)
            if twin is not None and any(args):
                f.id = twin
            elif f.id in _PLAIN_HELPER and not any(args) and not any(kws):
                f.id = _PLAIN_HELPER[f.id]
        recv = self._receiver(node)
        node = self.generic_visit(node)  # type: ignore[assignment]
        if recv is not None:
            holder, field = recv
            if isinstance(field, int):
                holder[field] = _call("_touchr_", holder[field])
            else:
                setattr(holder, field, _call("_touchr_", getattr(holder, field)))
        if transparent:
            return node
        for i, bad in enumerate(args):
            if bad:
                a = node.args[i]
                if isinstance(a, ast.Starred):
                    a.value = _touch(a.value)
                else:
                    node.args[i] = _touch(a)
        for k, bad in zip(node.keywords, kws, strict=True):
            if bad:
                k.value = _touch(k.value)
        return node

    def _receiver(self, node: ast.Call) -> tuple[Any, Any] | None:
        """Where the receiver of ``lst.sort()``-like calls sits (and is tainted)."""
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in _RECEIVER and self.tainted(f.value):
            return f, "value"
        if (
            isinstance(f, ast.Call)
            and isinstance(f.func, ast.Name)
            and f.func.id == "_getattr_"
            and len(f.args) == 2
            and isinstance(f.args[1], ast.Constant)
            and f.args[1].value in _RECEIVER
            and self.tainted(f.args[0])
        ):
            return f.args, 0
        return None


class TrackingPolicy(RulePolicy):
    """:class:`~rules.policy.RulePolicy`, then the tracked rewrites (module docstring)."""

    def visit_Module(self, node: ast.Module) -> ast.AST:
        node = super().visit_Module(node)  # type: ignore[assignment]
        if not self.errors:
            tracker = _Tracker(node)
            tracker.collect()
            tracker.fuse()
            tracker.taint()
            tracker.fuse_fields()
            tracker.rewrite()
            if tracker.timeless():
                # read by RuleSet: this rule never sees ctx, its horizon is "never"
                mark = ast.Assign(
                    targets=[ast.Name(TIMELESS, ast.Store())], value=ast.Constant(True)
                )
                node.body.append(ast.fix_missing_locations(ast.copy_location(mark, node.body[-1])))
        return node
