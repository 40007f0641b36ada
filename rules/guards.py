"""Runtime guards and the restricted builtins of the rule sandbox.

rules/policy.py rewrites rule code so that a few operations go through the
functions below; everything else runs as plain Python (the policy refuses at
compile time what could not be made safe). Each guard says below why it is
enough; the reachable objects are the profile (JSON types), the frozen
:class:`~rules.context.Context`, dates, the helpers and the builtins listed in
:data:`SAFE_BUILTINS`.

Size limits exist because one C-level operation (``'a' * 10**10``) cannot be
interrupted by the time budget (rules/budget.py); they bound what a single
operation can produce, and every guard checks an upper bound of the result's
size *before* the operation runs:

* strings: :data:`MAX_STR` characters; lists/tuples: :data:`MAX_ITEMS` items;
* ints: :data:`MAX_INT_BITS` bits; ``range``: :data:`MAX_RANGE` items.

Operations that can multiply sizes, and how each is bounded:

* text of a value (``str(x)``, f-string values, ``%s``/``%r``): :func:`text_size`
  walks containers, dict views and exception arguments, counting the repr of
  each string with its escapes (``repr`` up to 10 characters per character for
  non-printable ones, ``ascii`` likewise for non-ASCII), and stops as soon as the
  running total passes the limit (so the walk is at most ~limit/2 steps);
* ``%``-formatting: :func:`percent_size` parses the format like CPython does and
  adds, per directive, the size of its argument's text or number and its width;
* f-strings: the policy gives each of the ``k`` values of one f-string
  ``MAX_STR / k`` (and bounds the constant format specs), so the total is bounded;
* string methods with a bounded growth factor (``upper`` 3x, ``lower`` 2x,
  ``encode`` 4-100x by codec and error handler, ``bytes.hex`` 3x, ...): free when
  ``len * factor`` is within the limit, else checked with the call's arguments;
* ``join``, ``replace``, ``extend``, ``*``, ``+``, ``+=``, ``*=``, ``**``, ``<<``,
  ``round``, ``range``, ``sum`` and ``[*a, *a]`` / ``f(*a, *a)`` unpacking.
"""

from __future__ import annotations

import _strptime  # noqa: F401 - datetime.strptime imports it lazily: see DATE_CALLS
import itertools
import operator
import sys
import time  # noqa: F401 - date.strftime imports it lazily: see DATE_CALLS
from collections.abc import Callable, Iterable
from datetime import date as _date
from datetime import time as _time
from typing import Any, TypeVar

from base.errors import RuleRuntimeError
from rules.budget import current_slot

__all__ = [
    "ASCII",
    "MAX_DATE_FORMAT",
    "MAX_INT_BITS",
    "MAX_ITEMS",
    "MAX_RANGE",
    "MAX_STR",
    "REPR",
    "SAFE_BUILTINS",
    "STR",
    "UNSAFE_ATTRS",
    "reads_clock",
    "SafeStr",
    "check_text_call",
    "container_ids",
    "make_rule_guards",
    "percent_size",
    "text_size",
]

MAX_STR = 100_000
MAX_ITEMS = 100_000
MAX_INT_BITS = 100_000
MAX_RANGE = 1_000_000
MAX_ROUND_DIGITS = 1_000
MAX_DATE_FORMAT = 1_000  # strftime/strptime format and input (``%c`` is 12x its size)

_SEQ = (str, bytes, list, tuple)
_NoneType = type(None)
_SCALARS = (int, float, bool, _NoneType)

# Methods that are dangerous on objects a rule or template can reach, whatever the
# arguments; the rule policy refuses them at compile time, the template sandbox
# (rules/templates.py) at run time.
# fmt: off
UNSAFE_ATTRS = frozenset({
    "mro",  # KeyError.mro() -> BaseException, object
    "to_bytes", "from_bytes",  # (1).to_bytes(10**10); ints past MAX_INT_BITS
    "clear_cache", "no_cache", "from_file",  # ZoneInfo (ctx.now.tzinfo) class methods
    "with_traceback",
})
# fmt: on


def _refuse(message: str) -> RuleRuntimeError:
    return RuleRuntimeError(message)


def _check_len(n: int, seq: Any, what: str) -> None:
    text = isinstance(seq, (str, bytes))
    limit = MAX_STR if text else MAX_ITEMS
    if n > limit:
        unit = "characters" if text else "items"
        raise _refuse(f"{what} would have {n:,} {unit} (limit {limit:,})")


# -- size of the text of a value --------------------------------------------------

STR, REPR, ASCII = 0, 1, 2  # str(x), repr(x), ascii(x)
_DICT_VIEWS: tuple[type, ...] = (type({}.keys()), type({}.values()))
_DICT_ITEMS: type = type({}.items())
_PRINTABLE_BYTES = bytes(range(32, 127))
_chain = itertools.chain.from_iterable
# Other types whose text shows their contents (rules/templates.py registers
# Jinja's Namespace): type -> function giving what the text is made of.
TEXT_EXPANDERS: dict[type, Any] = {}


def _str_text(s: str, mode: int) -> int:
    """Upper bound of the length of ``s`` rendered in ``mode``."""
    n = len(s)
    if mode == STR:
        return n
    if s.isascii() or mode == REPR:
        if s.isprintable():  # only the quotes and backslashes are escaped
            return n + 2 + s.count("\\") + s.count("'")
        return (4 if s.isascii() else 10) * n + 2  # \x00 / \U000e0001
    return 10 * n + 2  # ascii() of non-ASCII text: \U0001f600


def _bytes_text(b: bytes) -> int:
    odd = len(b.translate(None, _PRINTABLE_BYTES))  # bytes shown as \xNN
    return len(b) + 3 + 3 * odd + b.count(b"\\") + b.count(b"'")


def text_size(x: Any, limit: int, mode: int = STR) -> int:
    """An upper bound of ``len(str(x))`` (``repr``/``ascii`` with ``mode``), computed
    without building it; the count stops (returning more than ``limit``) as soon
    as it passes ``limit``, so its cost is bounded by the limit, not by ``x``.

    Needed because a list of 10**5 references to one 64 KB string is small in
    memory but its text is 6.4 GB, produced in one C call; likewise a dict view
    (``str(d.values())``), an exception carrying such a list, a ``%`` format
    naming one big argument many times.
    """
    inner = ASCII if mode == ASCII else REPR
    total = 0
    stack = [x]
    m = mode
    while stack:
        v = stack.pop()
        t = type(v)
        if t is str:
            total += _str_text(v, m)
        elif t is int:
            total += v.bit_length() // 3 + 2
        elif t is float or t is bool or v is None:
            total += 24
        elif t is list or t is tuple or t is set or t is frozenset:
            total += 12 + 2 * len(v)
            if total > limit:
                break
            stack.extend(v)
        elif t is dict:
            total += 2 + 4 * len(v)
            if total > limit:
                break
            stack.extend(v.keys())
            stack.extend(v.values())
        elif t is bytes:
            total += _bytes_text(v)
        elif t in _DICT_VIEWS:
            total += 20 + 2 * len(v)
            if total > limit:
                break
            stack.extend(v)
        elif t is _DICT_ITEMS:
            total += 20 + 8 * len(v)
            if total > limit:
                break
            stack.extend(_chain(v))
        elif isinstance(v, str):  # str subclasses (Jinja's Markup)
            total += _str_text(v, m) + 16
        elif isinstance(v, dict):  # subclasses (rules/why.py's proxies): the raw items
            total += 32 + 4 * len(v)
            if total > limit:
                break
            stack.extend(dict.keys(v))
            stack.extend(dict.values(v))
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 32 + 2 * len(v)
            if total > limit:
                break
            if isinstance(v, list):
                stack.extend(list.__iter__(v))
            else:
                stack.extend(v)
        elif isinstance(v, BaseException):
            total += 40 + len(t.__name__)
            stack.extend(v.args)
        elif t is range:
            total += 16
            stack.extend((v.start, v.stop, v.step))
        elif t in TEXT_EXPANDERS:
            total += 32
            stack.append(TEXT_EXPANDERS[t](v))
        elif isinstance(v, int):  # rules/horizon.py's tracked ints: sized as their value
            total += int.bit_length(v) // 3 + 2
        else:
            total += 64  # dates, functions, iterators, ...: short fixed reprs
        if total > limit:
            break
        m = inner
    return total


def _check_text(x: Any, limit: int, mode: int = STR) -> None:
    if text_size(x, limit, mode) > limit:
        raise _refuse(f"text of a {type(x).__name__} would exceed {limit:,} characters")


# -- %-formatting --------------------------------------------------------------------

_DIGITS = "0123456789"
_INT_CONV = "diouxXc"
_FLOAT_CONV = "eEfFgG"


def _number_arg(
    text: str, j: int, args: Any, state: list[int], max_width: int | None
) -> tuple[int, int]:
    """Parse a width/precision at ``text[j:]``: (value, next index)."""
    n = len(text)
    if j < n and text[j] == "*":
        if max_width is not None:
            raise _refuse(f"%-format width/precision must be a number up to {max_width}")
        value = _next_arg(args, state)
        return (abs(value) if type(value) is int else 0), j + 1
    start = j
    while j < n and text[j] in _DIGITS:
        j += 1
    digits = text[start:j]
    if not digits:
        return 0, j
    if max_width is not None and len(digits) > len(str(max_width)):
        raise _refuse(f"%-format width/precision must be a number up to {max_width}")
    return (int(digits) if len(digits) < 12 else 10**12), j


class _NoArg(Exception):
    pass


def _next_arg(args: Any, state: list[int]) -> Any:
    i = state[0]
    if type(args) is tuple or isinstance(args, tuple):
        if i >= len(args):
            raise _NoArg
        state[0] = i + 1
        return args[i]
    if i:
        raise _NoArg
    state[0] = 1
    return args


def percent_size(fmt: str | bytes, args: Any, limit: int, max_width: int | None = None) -> int:
    """An upper bound of ``len(fmt % args)``, without formatting; stops counting
    (returning more than ``limit``) as soon as it passes ``limit``.

    Parses directives as CPython does (``%(key)``, flags, width, ``.precision``,
    length modifier, conversion) and adds, per directive, the larger of its width
    and the size of its argument: :func:`text_size` for ``%s``/``%r``/``%a``,
    the digits of an int (or of a float, ~330) plus the precision for numbers.
    A format CPython would reject ends the count there (the ``%`` then raises
    before building anything bigger). ``max_width``: refuse ``*`` and widths or
    precisions over it (the rules' policy).
    """
    is_bytes = isinstance(fmt, bytes)
    text = fmt.decode("latin-1") if isinstance(fmt, bytes) else fmt
    n = len(text)
    total = n
    state = [0]
    i = text.find("%")
    while i >= 0 and i + 1 < n:
        j = i + 1
        if text[j] == "%":
            i = text.find("%", j + 1)
            continue
        key = None
        if text[j] == "(":
            depth, k = 1, j + 1
            while k < n and depth:
                c = text[k]
                if c == "(":
                    depth += 1
                elif c == ")":
                    depth -= 1
                k += 1
            if depth:
                break
            key, j = text[j + 1 : k - 1], k
        while j < n and text[j] in "-+ #0":
            j += 1
        try:
            width, j = _number_arg(text, j, args, state, max_width)
            prec = 0
            if j < n and text[j] == ".":
                prec, j = _number_arg(text, j + 1, args, state, max_width)
            if j < n and text[j] in "hlL":
                j += 1
            if j >= n:
                break
            conv = text[j]
            if key is not None:
                try:
                    arg = args[key.encode("latin-1") if is_bytes else key]
                except Exception:  # noqa: BLE001 - '%' raises the same error itself
                    break
            else:
                arg = _next_arg(args, state)
        except _NoArg:
            break
        if conv in "sra" or (is_bytes and conv == "b"):
            if is_bytes and conv in "sb" and isinstance(arg, bytes):
                size = len(arg)
            else:
                mode = STR if conv in "sb" else (ASCII if conv == "a" or is_bytes else REPR)
                size = text_size(arg, limit, mode)
        elif conv in _INT_CONV or conv in _FLOAT_CONV:
            size = arg.bit_length() // 3 + 4 if isinstance(arg, int) else 330
            size = max(size, 330) + prec if conv in _FLOAT_CONV else max(size, prec)
        else:
            break  # unsupported format character: ValueError
        total += max(width, size) + 2
        if total > limit:
            return total
        i = text.find("%", j + 1)
    return total


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


def guarded_mod(a: Any, b: Any) -> Any:
    """``a % b``; for %-formatting of strings refuses ``*`` and widths/precisions over
    999 and bounds the result (:func:`percent_size`) before formatting."""
    if not isinstance(a, (str, bytes)):
        return a % b
    if percent_size(a, b, MAX_STR, max_width=999) > MAX_STR:
        raise _refuse(f"'%' result would exceed {MAX_STR:,} characters")
    return a % b


# -- text rendering (f-string values, str()) -------------------------------------

# render_guard ``mode``: the f-string conversion: none (STR), REPR, ASCII, or
# _EXPLICIT_STR for ``!s`` (which matters with a spec: f"{5!s:>3}").
_EXPLICIT_STR = 3
# str(int) raises past sys.get_int_max_str_digits() (0: no limit, then always check)
_INT_TEXT_MAX = (sys.get_int_max_str_digits() or 10**9) + 8


def render_guard(x: Any, limit: int = MAX_STR, mode: int = 0, spec: str | None = None) -> Any:
    """Return ``x`` unchanged if its text is within ``limit``; used around f-string
    values (the policy passes ``MAX_STR / k`` for an f-string with ``k`` values)
    and by ``str()``.

    With a conversion (``!r``/``!a``) or a format spec, the policy moves them here:
    the value is converted and formatted in this frame and the string returned. That
    way ``f"{ctx.today:%d.%m}"`` runs strftime with this module's builtins (it
    imports ``time`` through ``__import__``, which rules do not have).
    """
    t = type(x)
    if t is str and not mode:
        if len(x) > limit:
            whole = f" ({MAX_STR:,} for the whole f-string)" if limit < MAX_STR else ""
            raise _refuse(f"f-string value exceeds {limit:,} characters{whole}")
        if spec is None:
            return x
    elif t is int:
        # Decimal text is at most 4,300 digits (sys.int_info.str_digits_check_threshold
        # above that raises); a spec may show it in binary ({n:_b}).
        if spec is None and not mode and limit >= _INT_TEXT_MAX:
            return x
        if (x.bit_length() * 4 // 3 if spec else x.bit_length() // 3) + 4 > limit:
            raise _refuse(f"text of an int would exceed {limit:,} characters")
    elif t is float or t is bool or x is None:
        if spec is None and not mode:
            return x
    elif text_size(x, limit, STR if mode == _EXPLICIT_STR else mode) > limit:
        raise _refuse(f"text of a {t.__name__} would exceed {limit:,} characters")
    if mode:
        x = repr(x) if mode == REPR else ascii(x) if mode == ASCII else str(x)
    if spec is not None:
        return format(x, spec)  # constant spec, width/precision <= 999 (rules/policy.py)
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
    methods (``str.lower(s)``, checked like ``s.lower()``) behave as usual.
    """

    # returns a plain str, not a SafeStr: mypy requires __new__ to return the class
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


def safe_unpack(x: Any, limit: int) -> Any:
    """``*x`` in a list/tuple/set display or a call with ``k`` starred items: the
    policy passes ``MAX_ITEMS / k``, so ``[*a, *a, ...]`` stays within MAX_ITEMS.
    ``x`` is returned as it is (iterators are materialised once, as Python would)."""
    try:
        n = len(x)
    except TypeError:
        x = tuple(x)
        n = len(x)
    if n > limit:
        raise _refuse(f"unpacking {n:,} items here would exceed {MAX_ITEMS:,} items in all")
    return x


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


# -- methods of strings (and dates) whose result can be bigger than the object --------

# Upper bound of len(result) / len(obj), whatever the arguments: only U+0130 grows
# in lower() (2 characters), upper/title/swapcase/casefold/capitalize up to 3
# ('ΐ'.upper()), encode 100 ('namereplace' writes \N{...} names of up to 88
# letters), decode 4 ('backslashreplace': \xNN per byte), bytes.hex(sep) 3.
# fmt: off
GROWTH = {
    "upper": 3, "lower": 2, "casefold": 3, "swapcase": 3, "title": 3, "capitalize": 3,
    "encode": 100, "decode": 4, "hex": 3,
}
_ENCODINGS = {
    "utf8": 4, "utf16": 4, "utf32": 4, "ascii": 1, "latin1": 1, "iso88591": 1, "cp1251": 1,
    "cp1252": 1, "koi8r": 1, "unicodeescape": 10, "rawunicodeescape": 10,
}
_ERROR_HANDLERS = {
    "strict": 1, "ignore": 1, "replace": 1, "surrogateescape": 1, "surrogatepass": 4,
    "backslashreplace": 10, "xmlcharrefreplace": 10, "namereplace": 100,
}
# fmt: on
# Methods of dates/times that import ``time``/``_strptime`` lazily, through the
# ``__import__`` of the calling frame's builtins: from a rule's frame, which has
# none, they fail with KeyError '__import__'. Rules get them through
# _checked_method, whose frame is this module's (the modules are imported above, so
# nothing is executed under a rule's budget); strftime/strptime formats are bounded.
DATE_CALLS = frozenset({"strftime", "strptime", "timetuple", "utctimetuple"})
# Names check_text_call knows (methods of str/bytes, or of dates).
# fmt: off
TEXT_CALLS = frozenset(GROWTH) | DATE_CALLS | {
    "join", "replace", "center", "ljust", "rjust", "zfill", "expandtabs", "translate",
}
_ASCII_COMPATIBLE = frozenset({
    "utf8", "ascii", "latin1", "iso88591", "cp1251", "cp1252", "koi8r",
})
# fmt: on


def _encode_factor(s: str | bytes, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    enc = args[0] if args else kwargs.get("encoding", "utf-8")
    err = args[1] if len(args) > 1 else kwargs.get("errors", "strict")
    if type(enc) is not str:
        return 1  # encode raises TypeError
    enc = enc.lower().replace("-", "").replace("_", "")
    if enc in _ASCII_COMPATIBLE and s.isascii():
        return 1
    e = _ENCODINGS.get(enc, 10)
    r = _ERROR_HANDLERS.get(err, 100) if type(err) is str else 1
    return max(e, r)


def _lengths(items: Any, limit: int) -> int:
    try:
        return sum(map(len, items))
    except TypeError:  # e.g. Markup.join escapes non-strings: their text
        return sum(text_size(x, limit) for x in items)


def check_text_call(
    obj: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], limit: int = MAX_STR
) -> tuple[Any, ...]:
    """Refuse (RuleRuntimeError) ``obj.name(*args, **kwargs)`` when its result could
    exceed ``limit`` characters/bytes; return the arguments to call it with (an
    iterable given to ``join`` comes back as a list, measured).

    ``obj`` is a str/bytes (subclasses such as Jinja's Markup escape what they add:
    counted 6x), or a date/time for ``strftime``/``strptime`` (format and input up
    to :data:`MAX_DATE_FORMAT`). Names not in :data:`TEXT_CALLS` pass.
    """
    if name in DATE_CALLS:
        for a in (*args, *kwargs.values()):
            if isinstance(a, str) and len(a) > MAX_DATE_FORMAT:
                raise _refuse(f"{name}() format/input longer than {MAX_DATE_FORMAT:,} characters")
        return args
    if not isinstance(obj, (str, bytes)):
        return args
    n = len(obj)
    esc = 1 if type(obj) is str or type(obj) is bytes else 6
    if name in GROWTH:
        factor = _encode_factor(obj, args, kwargs) if name == "encode" else GROWTH[name]
        size = n * factor + (8 if factor > 1 else 0)  # a BOM
    elif name == "join":
        if not args:
            return args
        items = args[0] if type(args[0]) in (list, tuple) else list(args[0])
        args = (items, *args[1:])
        size = esc * (_lengths(items, limit) + n * max(len(items) - 1, 0))
    elif name == "replace":
        old, new = (args + (None, None))[:2]
        count = args[2] if len(args) > 2 else kwargs.get("count", -1)
        if not (isinstance(old, (str, bytes)) and isinstance(new, (str, bytes))):
            return args
        # a str/bytes mix raises count()'s TypeError, as replace() itself would
        k = obj.count(old) if old else n + 1  # type: ignore[arg-type]
        if isinstance(count, int) and count >= 0:
            k = min(k, count)
        size = n + k * max(esc * len(new) - len(old), 0)
    elif name in ("center", "ljust", "rjust", "zfill"):
        width = args[0] if args else kwargs.get("width", 0)
        size = esc * max(n, width if isinstance(width, int) else 0)
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        tabs = obj.count("\t") if isinstance(obj, str) else obj.count(b"\t")
        size = esc * (n + tabs * max(tab if isinstance(tab, int) else 0, 1))
    elif name == "translate":
        table = args[0] if args else None
        if isinstance(obj, bytes) or table is None:
            return args
        values: Iterable[Any]
        if isinstance(table, dict):
            values = table.values()
        elif isinstance(table, (list, tuple, str)):
            values = table
        else:
            raise _refuse("translate() table must be a dict, list or string")
        longest = max((len(v) for v in values if isinstance(v, str)), default=1)
        size = esc * n * max(longest, 1)
    else:
        return args
    if size > limit:
        raise _refuse(f"{name}() result would have {size:,} characters (limit {limit:,})")
    return args


def _checked_method(obj: Any, name: str) -> Any:
    method = getattr(obj, name)  # AttributeError as usual

    def call(*args: Any, **kwargs: Any) -> Any:
        args = check_text_call(obj, name, args, kwargs)
        return method(*args, **kwargs)

    return call


def text_attr(obj: Any, name: str) -> Any:
    """``obj.name`` for the size-sensitive names of :data:`GUARDED_ATTRS` (not the
    mutators): the method itself when its growth factor keeps it within the limit
    whatever the arguments, else a wrapper checking the call first."""
    t = type(obj)
    if t is str or t is bytes:
        grow = GROWTH.get(name)
        if grow is not None and len(obj) * grow <= MAX_STR:
            return getattr(obj, name)
        if name == "join":
            return _bounded_join(obj)
        if name == "replace":
            return _bounded_replace(obj)
        return _checked_method(obj, name)
    if isinstance(obj, type):
        return _unbound(obj, name, text_attr)  # str.upper(s): guarded like s.upper()
    attr = getattr(obj, name)
    if name in TEXT_CALLS and isinstance(obj, (str, bytes, _date, _time)):
        return _checked_method(obj, name)
    return attr


# ``s.lower()`` and the like, without arguments, are the common case: the policy
# rewrites them into ``_lower_(s)``, a direct check (~40 ns) instead of a load
# through ``_getattr_`` and a call of what it returns (~140 ns).
NULLARY_CALLS = ("upper", "lower", "casefold", "swapcase", "title", "capitalize")


def _nullary(name: str) -> Any:
    method = getattr(str, name)
    free = MAX_STR // GROWTH[name]

    def call(obj: Any) -> Any:
        if type(obj) is str and len(obj) <= free:
            return method(obj)
        return text_attr(obj, name)()

    call.__name__ = call.__qualname__ = f"_{name}_"
    return call


NULLARY_GUARDS = {f"_{name}_": _nullary(name) for name in NULLARY_CALLS}


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
# Class methods of date/datetime that read the machine's clock: reachable as
# ``ctx.now.now()``, they would bypass the one clock (and a pinned test date).
CLOCK_READS = frozenset({"now", "today", "utcnow", "fromtimestamp", "utcfromtimestamp"})
GUARDED_ATTRS = MUTATORS | {"join", "replace"} | set(GROWTH) | DATE_CALLS | CLOCK_READS


def reads_clock(obj: Any, name: str) -> bool:
    """``obj.name`` would read the machine's clock (``ctx.now.now()``,
    ``ctx.today.today()``); ``ctx.now`` itself is fine."""
    return name in CLOCK_READS and (
        isinstance(obj, _date) or (isinstance(obj, type) and issubclass(obj, _date)))


def container_ids(root: Any) -> set[int]:
    ids: set[int] = set()
    stack = [root]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            if id(v) not in ids:
                ids.add(id(v))
                stack.extend(dict.values(v))
        elif isinstance(v, (list, tuple, set)):
            if id(v) not in ids:
                ids.add(id(v))
                stack.extend(v)
    return ids


_INPLACE: dict[str, Callable[[Any, Any], Any]] = {
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
        if name not in MUTATORS:
            if reads_clock(obj, name):
                raise _refuse(f".{name}() reads the machine's clock: use ctx.today / ctx.now")
            return text_attr(obj, name)
        if isinstance(obj, type):
            # dict.update(profile, ...) would mutate through the unbound method.
            raise _refuse(f"call .{name}() on a value, not on the type")
        attr = getattr(obj, name)
        if isinstance(obj, (dict, list, set)) and is_locked(obj):
            raise _refuse(f"the profile is read-only: .{name}() refused (copy it first)")
        if name == "extend" and isinstance(obj, list):
            return _bounded_extend(obj)
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
        "_unpack_": safe_unpack,
        **NULLARY_GUARDS,
    }


def _unbound(cls: type, name: str, guard: Any) -> Any:
    getattr(cls, name)  # AttributeError as usual
    what = "str" if cls is SafeStr else cls.__name__

    def call(self: Any, /, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(self, cls):
            raise TypeError(f"descriptor '{name}' requires a '{what}' object")
        return guard(self, name)(*args, **kwargs)

    return call


def _bounded_extend(lst: list[Any]) -> Any:
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


_Text = TypeVar("_Text", str, bytes)


def _bounded_replace(s: _Text) -> Any:
    def replace(old: Any, new: Any, count: Any = -1, /) -> Any:
        if type(old) is type(s) and type(new) is type(s) and len(new) > len(old):
            n = s.count(old) if old else len(s) + 1
            if isinstance(count, int) and count >= 0:
                n = min(n, count)
            _check_len(len(s) + n * (len(new) - len(old)), s, "replace() result")
        return s.replace(old, new, count)

    return replace
