"""Runtime guards and the restricted builtins of the rule sandbox.

rules/policy.py rewrites rule code so that a few operations go through the
functions below; everything else runs as plain Python (the policy refuses at
compile time what could not be made safe). Each guard says below why it is
enough; the reachable objects are the profile (JSON types), the frozen
:class:`~rules.context.Context`, dates, the helpers and the builtins listed in
:data:`SAFE_BUILTINS`.

Size limits exist because one C-level operation (``'a' * 10**10``) cannot be
interrupted by the time budget (rules/budget.py); they bound what a single
operation can produce:

* strings: :data:`MAX_STR` characters; lists/tuples: :data:`MAX_ITEMS` items;
* ints: :data:`MAX_INT_BITS` bits; ``range``: :data:`MAX_RANGE` items.
"""

from __future__ import annotations

import operator
import re
from typing import Any

from kvadrupel.errors import RuleRuntimeError
from rules.budget import current_slot

__all__ = [
    "MAX_INT_BITS",
    "MAX_ITEMS",
    "MAX_RANGE",
    "MAX_STR",
    "SAFE_BUILTINS",
    "SafeStr",
    "container_ids",
    "make_rule_guards",
]

MAX_STR = 100_000
MAX_ITEMS = 100_000
MAX_INT_BITS = 100_000
MAX_RANGE = 1_000_000
MAX_ROUND_DIGITS = 1_000

_SEQ = (str, bytes, list, tuple)
_NoneType = type(None)
_SCALARS = (int, float, bool, _NoneType)


def _refuse(message: str) -> RuleRuntimeError:
    return RuleRuntimeError(message)


def _check_len(n: int, seq: Any, what: str) -> None:
    text = isinstance(seq, (str, bytes))
    limit = MAX_STR if text else MAX_ITEMS
    if n > limit:
        unit = "characters" if text else "items"
        raise _refuse(f"{what} would have {n:,} {unit} (limit {limit:,})")


# -- arithmetic (wired in by the policy for *, **, <<, %, and + of two non-constants) --


def guarded_mul(a: Any, b: Any) -> Any:
    """``a * b``, refusing sequence repetitions and int products over the limits."""
    ta, tb = type(a), type(b)
    if ta is float or tb is float:
        return a * b
    if ta is int and tb is int:
        if a.bit_length() + b.bit_length() > MAX_INT_BITS:
            raise _refuse(f"'*' result would exceed {MAX_INT_BITS:,} bits")
        return a * b
    if isinstance(b, int) and isinstance(a, _SEQ):
        _check_len(len(a) * b, a, "'*' result")
    elif isinstance(a, int) and isinstance(b, _SEQ):
        _check_len(len(b) * a, b, "'*' result")
    elif isinstance(a, int) and isinstance(b, int):  # bools
        if a.bit_length() + b.bit_length() > MAX_INT_BITS:
            raise _refuse(f"'*' result would exceed {MAX_INT_BITS:,} bits")
    return a * b


def guarded_pow(a: Any, b: Any) -> Any:
    """``a ** b``, refusing int powers over :data:`MAX_INT_BITS` bits (``10**10**10``)."""
    if isinstance(b, int) and b > 1 and isinstance(a, int) and not -1 <= a <= 1:
        if b * a.bit_length() > MAX_INT_BITS:
            raise _refuse(f"'**' result would exceed {MAX_INT_BITS:,} bits")
    return a**b


def guarded_lshift(a: Any, b: Any) -> Any:
    """``a << b``, refusing results over :data:`MAX_INT_BITS` bits."""
    if isinstance(a, int) and isinstance(b, int) and a and b > 0:
        if a.bit_length() + b > MAX_INT_BITS:
            raise _refuse(f"'<<' result would exceed {MAX_INT_BITS:,} bits")
    return a << b


def guarded_add(a: Any, b: Any) -> Any:
    """``a + b`` of two non-constants: bounds string/list/tuple concatenation
    (``s = s + s`` doubles per step)."""
    ta = type(a)
    if (ta is str or ta is list or ta is tuple or ta is bytes) and type(b) is ta:
        _check_len(len(a) + len(b), a, "'+' result")
    return a + b


# %-format directives: optional (name), flags, width, precision, conversion.
_PERCENT = re.compile(r"%(?:\([^)]*\))?[#0 +\-]*(\*|\d*)(?:\.(\*|\d*))?")


def guarded_mod(a: Any, b: Any) -> Any:
    """``a % b``; for %-formatting of strings refuses ``*`` and widths/precisions over 999
    and checks the size of the arguments' text."""
    if not isinstance(a, (str, bytes)):
        return a % b
    for m in _PERCENT.finditer(a if isinstance(a, str) else a.decode("latin-1")):
        for part in m.groups():
            if part and (part == "*" or len(part) > 3):
                raise _refuse("%-format width/precision must be a number up to 999")
    render_guard(b)
    out = a % b
    _check_len(len(out), out, "'%' result")
    return out


# -- text rendering (f-string values, str(), %-format arguments) -------------


def _render_size(x: Any, limit: int) -> None:
    """Refuse when the text of ``x`` (str/repr) would exceed ``limit`` characters.

    Needed because a list of 10**5 references to one 64 KB string is small in
    memory but its repr is 6.4 GB, produced in one C call.
    """
    total = 0
    stack = [x]
    while stack:
        v = stack.pop()
        t = type(v)
        if t is str or t is bytes:
            total += len(v) + 2
        elif t is int:
            total += v.bit_length() // 3 + 2
        elif t in _SCALARS:
            total += 24
        elif t is list or t is tuple or t is set or t is frozenset:
            total += 2 + 2 * len(v)
            stack.extend(v)
        elif t is dict:
            total += 2 + 4 * len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, BaseException):
            total += 40
            stack.extend(v.args)
        else:
            total += 64  # dates, functions, ...: short fixed reprs
        if total > limit:
            raise _refuse(f"text of a {type(x).__name__} would exceed {limit:,} characters")


def render_guard(x: Any) -> Any:
    """Return ``x`` unchanged if its text is within :data:`MAX_STR`; used around f-string values."""
    t = type(x)
    if t is str:
        if len(x) > MAX_STR:
            raise _refuse(f"f-string value exceeds {MAX_STR:,} characters")
        return x
    if t in _SCALARS:
        return x
    _render_size(x, MAX_STR)
    return x


class _StrMeta(type):
    # ``isinstance(x, str)`` in a rule must keep working although ``str`` is SafeStr.
    def __instancecheck__(cls, obj: object) -> bool:
        return isinstance(obj, str)

    def __subclasscheck__(cls, sub: type) -> bool:
        return issubclass(sub, str)


class SafeStr(str, metaclass=_StrMeta):
    """``str`` as rules see it: ``str(x)`` checks the size of ``x``'s text first.

    ``SafeStr(x)`` returns a plain ``str``; ``isinstance(s, str)`` and unbound
    methods (``str.lower(s)``) behave as usual.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> str:  # type: ignore[misc]
        if args:
            render_guard(args[0])
        return str(*args, **kwargs)


# -- builtins ------------------------------------------------------------------


def safe_range(*args: Any) -> range:
    """``range`` refusing more than :data:`MAX_RANGE` items (``sum(range(10**12))`` runs in C)."""
    r = range(*args)
    try:
        n = len(r)
    except OverflowError:
        n = MAX_RANGE + 1
    if n > MAX_RANGE:
        raise _refuse(f"range() of more than {MAX_RANGE:,} items")
    return r


def safe_sum(iterable: Any, /, start: Any = 0) -> Any:
    """``sum`` of numbers only: ``sum(lists, [])`` is quadratic in C."""
    if type(start) not in (int, float, bool):
        raise _refuse("sum() start must be a number")
    return sum(iterable, start)


def safe_round(number: Any, ndigits: Any = None) -> Any:
    """``round`` with ``|ndigits| <= 1000`` (``round(5, -10**9)`` computes 10**(10**9))."""
    if ndigits is None:
        return round(number)
    if isinstance(ndigits, int) and not -MAX_ROUND_DIGITS <= ndigits <= MAX_ROUND_DIGITS:
        raise _refuse(f"round() ndigits must be within ±{MAX_ROUND_DIGITS}")
    return round(number, ndigits)


# Exceptions a rule may name in ``except``. Not ``Exception``: when the time-budget
# interrupt lands at the recursion limit inside an ``except`` block, CPython fails
# to instantiate it and raises RecursionError instead, which ``except Exception``
# would swallow (tests/rules/test_escapes.py, "catch-all-at-recursion-limit").
CATCHABLE = {
    "ArithmeticError": ArithmeticError,
    "AttributeError": AttributeError,
    "IndexError": IndexError,
    "KeyError": KeyError,
    "LookupError": LookupError,
    "TypeError": TypeError,
    "ValueError": ValueError,
    "ZeroDivisionError": ZeroDivisionError,
}

# ``isinstance`` is the real builtin: the only type objects a rule can reach are
# the ones below (``type``, ``__class__``, ``mro`` are refused by the policy), so a
# wrapper checking its second argument would add cost, not safety.
# fmt: off
SAFE_BUILTINS: dict[str, Any] = {
    "len": len, "min": min, "max": max, "sum": safe_sum, "abs": abs, "any": any, "all": all,
    "sorted": sorted, "round": safe_round, "int": int, "float": float, "str": SafeStr,
    "bool": bool, "list": list, "dict": dict, "set": set, "tuple": tuple,
    "range": safe_range, "enumerate": enumerate, "zip": zip, "isinstance": isinstance,
    "True": True, "False": False, "None": None,
    "Exception": Exception,  # to raise, not to catch
    **CATCHABLE,
}
# fmt: on
EXCEPTION_NAMES = frozenset(CATCHABLE) | {"Exception"}

# -- the profile is read-only --------------------------------------------------

# Methods that mutate their object; the policy routes attribute loads of these names
# (and of the size-sensitive ones) through ``_getattr_``.
# fmt: off
MUTATORS = frozenset({
    "append", "extend", "insert", "pop", "popitem", "remove", "clear", "update",
    "setdefault", "sort", "reverse", "add", "discard", "difference_update",
    "intersection_update", "symmetric_difference_update",
})
# fmt: on
GUARDED_ATTRS = MUTATORS | {"join", "replace"}


def container_ids(root: Any) -> set[int]:
    ids: set[int] = set()
    stack = [root]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            if id(v) not in ids:
                ids.add(id(v))
                stack.extend(v.values())
        elif isinstance(v, (list, tuple, set)):
            if id(v) not in ids:
                ids.add(id(v))
                stack.extend(v)
    return ids


_INPLACE = {
    "+=": guarded_add,
    "-=": operator.isub,
    "*=": guarded_mul,
    "/=": operator.itruediv,
    "//=": operator.ifloordiv,
    "%=": guarded_mod,
    "**=": guarded_pow,
    "<<=": guarded_lshift,
    ">>=": operator.irshift,
    "&=": operator.iand,
    "|=": operator.ior,
    "^=": operator.ixor,
    "@=": operator.imatmul,
}


def make_rule_guards(protected: set[int]) -> dict[str, Any]:
    """The guard functions of one rule. ``protected``: ids of the rule's own module-level
    constants (filled after the rule module ran), read-only like the profile."""

    def is_locked(obj: Any) -> bool:
        # The profile's containers are collected on the first write attempt of a
        # profile only: rules that never write pay nothing for the protection.
        i = id(obj)
        if i in protected:
            return True
        slot = current_slot()
        if slot.profile is None:
            return False
        owned = slot.owned
        if owned is None:
            owned = slot.owned = container_ids(slot.profile)
        return i in owned

    def write_guard(obj: Any) -> Any:
        """``obj[k] = v`` / ``del obj[k]``: only on dicts and lists the rule made itself."""
        if isinstance(obj, (dict, list)):
            if is_locked(obj):
                raise _refuse("the profile is read-only (copy it first: dict(x) / list(x))")
            return obj
        raise _refuse(f"cannot set or delete items of {type(obj).__name__!r}")

    def getattr_guard(obj: Any, name: str) -> Any:
        """Loads of :data:`GUARDED_ATTRS` names (every other attribute is a plain load)."""
        if isinstance(obj, type):
            # dict.update(profile, ...) would mutate through the unbound method.
            raise _refuse(f"call .{name}() on a value, not on the type")
        attr = getattr(obj, name)
        if name in MUTATORS and isinstance(obj, (dict, list, set)) and is_locked(obj):
            raise _refuse(f"the profile is read-only: .{name}() refused (copy it first)")
        if name == "extend" and isinstance(obj, list):
            return _bounded_extend(obj)
        if name == "join" and isinstance(obj, (str, bytes)):
            return _bounded_join(obj)
        if name == "replace" and isinstance(obj, (str, bytes)):
            return _bounded_replace(obj)
        return attr

    def inplace_guard(op: str, x: Any, y: Any) -> Any:
        """``name op= value`` (RestrictedPython's ``_inplacevar_``)."""
        if isinstance(x, (dict, list, set)) and is_locked(x):
            raise _refuse(f"the profile is read-only: '{op}' refused (copy it first)")
        if type(x) is list:  # in place, as in Python, once the size is known to be fine
            if op == "+=":
                items = y if type(y) in (list, tuple) else list(y)
                _check_len(len(x) + len(items), x, "'+=' result")
                x += items
                return x
            if op == "*=" and isinstance(y, int):
                _check_len(len(x) * y, x, "'*=' result")
                x *= y
                return x
        return _INPLACE[op](x, y)

    return {
        "_write_": write_guard,
        "_getattr_": getattr_guard,
        "_inplacevar_": inplace_guard,
        "_mul_": guarded_mul,
        "_pow_": guarded_pow,
        "_lshift_": guarded_lshift,
        "_add_": guarded_add,
        "_mod_": guarded_mod,
        "_render_": render_guard,
    }


def _bounded_extend(lst: list) -> Any:
    def extend(iterable: Any, /) -> None:
        items = iterable if type(iterable) in (list, tuple) else list(iterable)
        _check_len(len(lst) + len(items), lst, "extend() result")
        lst.extend(items)

    return extend


def _bounded_join(sep: str | bytes) -> Any:
    def join(iterable: Any, /) -> Any:
        items = iterable if type(iterable) in (list, tuple) else list(iterable)
        try:
            total = sum(map(len, items)) + len(sep) * max(len(items) - 1, 0)
        except TypeError:
            return sep.join(items)  # raises join's own TypeError
        _check_len(total, sep, "join() result")
        return sep.join(items)

    return join


def _bounded_replace(s: str | bytes) -> Any:
    def replace(old: Any, new: Any, count: Any = -1, /) -> Any:
        if type(old) is type(s) and type(new) is type(s) and len(new) > len(old):
            n = s.count(old) if old else len(s) + 1
            if isinstance(count, int) and count >= 0:
                n = min(n, count)
            _check_len(len(s) + n * (len(new) - len(old)), s, "replace() result")
        return s.replace(old, new, count)

    return replace
