"""Jinja2 templates for notification content, sandboxed.

Rule authors write the subject/text/html of e-mails and the title/body/link of
banners as Jinja2 templates that see the user's ``profile`` (and the match
context). They are rendered per user per match, so:

* compiled templates are kept in an LRU cache keyed by source;
* rendering runs in :class:`jinja2.sandbox.ImmutableSandboxedEnvironment`: no
  dunder/internal attributes (an unsafe access raises instead of rendering
  empty), no mutation of the profile, ``range`` capped by Jinja, and the methods
  the rule sandbox refuses (``mro``, ``to_bytes``/``from_bytes``, ZoneInfo's
  ``clear_cache``/``no_cache``/``from_file``, ``with_traceback``:
  :data:`rules.guards.UNSAFE_ATTRS`) are refused here too;
* sizes are bounded *before* anything is built, with the rule sandbox's
  estimators (rules/guards.py): every ``{{ value }}`` (its text, up to
  :data:`MAX_OUTPUT_CHARS`, and at most :data:`MAX_RENDER_CHARS` in all per
  render, captured blocks included), ``~``, ``+``, ``*``, ``**``, ``%``,
  ``str.format``, string methods (``center``, ``replace``, ``join``, ``upper``,
  ``encode``, ``expandtabs``, ``translate``, ``strftime`` ...) and the filters that
  grow text (``center``, ``format``, ``indent``, ``wordwrap``, ``join``,
  ``replace``, ``truncate``, ``urlize``, ``urlencode``, ``xmlattr``, ``tojson``,
  ``escape``, ``upper`` ..., ``batch``/``slice`` fill, ``sum``/``round``);
  ``pprint``, ``lipsum`` and ``tojson(indent=...)`` are not available; values
  stored in a ``namespace()`` may nest at most :data:`MAX_NESTING` deep (a deep
  tuple crashes CPython's hash); the output is capped as well;
* a missing profile field renders empty (``ChainableUndefined``: ``{{
  profile.address.city }}`` is "" when there is no address), but *using* it in
  arithmetic or a comparison is an error;
* HTML is autoescaped (a ``<script>`` in a profile value arrives as text); plain
  text and subjects are not escaped.

Every failure is a :class:`~base.errors.ChannelError` whose message says the
line. :func:`validate_template` / :func:`validate_content` give the same message
without raising, for checking a rule when it is saved.

Not bounded: the CPU time of a template that loops without producing output
(nested ``range`` loops, each up to 100,000): there is no deadline inside
rendering.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from datetime import date, time
from functools import lru_cache
from typing import Any, overload

from jinja2 import ChainableUndefined, Template, TemplateError, TemplateSyntaxError
from jinja2.compiler import CodeGenerator, optimizeconst
from jinja2.exceptions import SecurityError
from jinja2.filters import FILTERS, make_attrgetter
from jinja2.sandbox import (
    ImmutableSandboxedEnvironment,
    SandboxedEscapeFormatter,
    SandboxedFormatter,
)
from jinja2.utils import Namespace
from markupsafe import Markup

from base.errors import ChannelError, RuleRuntimeError
from rules.guards import (
    ASCII,
    REPR,
    TEXT_CALLS,
    TEXT_EXPANDERS,
    UNSAFE_ATTRS,
    check_text_call,
    percent_size,
    reads_clock,
    text_size,
)

__all__ = [
    "CACHE_SIZE",
    "MAX_NESTING",
    "MAX_OUTPUT_CHARS",
    "MAX_RENDER_CHARS",
    "clear_cache",
    "render_content",
    "render_html",
    "render_template",
    "validate_content",
    "validate_template",
]

CACHE_SIZE = 2048  # compiled templates kept per environment (text, html)
MAX_OUTPUT_CHARS = 1_000_000  # one rendered value; also the bound of one operation
MAX_RENDER_CHARS = 4 * MAX_OUTPUT_CHARS  # text of all {{ }} of one render, captured too
MAX_PRODUCT_ITEMS = 100_000  # "ab" * n, [x] * n
MAX_POWER_BITS = 100_000  # 2 ** n, a * b
MAX_NESTING = 100  # containers in a namespace() value
MAX_FILL = 10_000  # batch(n, fill) / slice(n) pieces
MAX_ROUND_DIGITS = 1_000

# Keys of a content spec rendered as HTML (autoescaped); every other string value
# is rendered as plain text.
HTML_KEYS = frozenset({"html"})

_TEMPLATE_FILENAME = "<template>"
_ESCAPED = 6  # escaping multiplies text by up to 6 ('"' -> '&#34;'); JSON \u003c


def _refuse(message: str) -> SecurityError:
    return SecurityError(message)


def _bounded(check: Callable[..., Any], *args: Any) -> Any:
    """Run a rules.guards check, its refusal turned into the sandbox's error."""
    try:
        return check(*args)
    except RuleRuntimeError as exc:
        raise _refuse(str(exc)) from None


def _check_text(value: Any, factor: int = 1, limit: int = MAX_OUTPUT_CHARS) -> int:
    size = text_size(value, limit // factor)
    if size > limit // factor:
        what = type(value).__name__
        raise _refuse(f"text of a {what} larger than {limit // factor:,} characters")
    return size


# -- per-render accounting of output ----------------------------------------------

_render_state = threading.local()


def _finalize(value: Any) -> Any:
    """Every ``{{ value }}``: its text is bounded before it is built, and charged to
    the render (captured ``{% set %}``/macro/filter blocks are not streamed out, so
    the output cap alone would not see them)."""
    t = type(value)
    if t is str:
        size = len(value)
        if size > MAX_OUTPUT_CHARS:
            raise _refuse(f"value larger than {MAX_OUTPUT_CHARS:,} characters")
    elif t is int or t is float or t is bool or value is None:
        size = 24 if t is not int else value.bit_length() // 3 + 2
    else:
        size = _check_text(value)
    spent = getattr(_render_state, "spent", None)
    if spent is not None:
        spent += size
        if spent > MAX_RENDER_CHARS:
            raise _refuse(f"template produced more than {MAX_RENDER_CHARS:,} characters")
        _render_state.spent = spent
    return value


def _capped_concat(parts: Any) -> str:
    """``Environment.concat``: joins captured blocks, macro bodies, filter blocks."""
    parts = list(parts)
    if sum(map(len, parts)) > MAX_OUTPUT_CHARS:
        raise _refuse(f"block larger than {MAX_OUTPUT_CHARS:,} characters")
    return "".join(parts)


# -- namespace(): the only state a template carries across loop iterations ----------


def _check_nesting(value: Any) -> None:
    """Refuse containers nested deeper than MAX_NESTING (hashing a deep tuple
    recurses in C without a limit: a crash, not an exception)."""
    heights: dict[int, int] = {}

    def height(v: Any, depth: int) -> int:
        if depth > MAX_NESTING:
            raise _refuse(f"values nested deeper than {MAX_NESTING} levels")
        if isinstance(v, Namespace):
            v = object.__getattribute__(v, "_Namespace__attrs")
        if not isinstance(v, (tuple, list, dict, set, frozenset)):
            return 0
        i = id(v)
        h = heights.get(i)
        if h is not None:
            if depth + h > MAX_NESTING:
                raise _refuse(f"values nested deeper than {MAX_NESTING} levels")
            return h
        heights[i] = 0  # a cycle (through a list/dict/namespace) is not deeper
        items = v.values() if isinstance(v, dict) else v
        h = 1 + max((height(c, depth + 1) for c in items), default=0)
        heights[i] = h
        return h

    height(value, 0)


class _Namespace(Namespace):
    """``namespace()``: Jinja's, with the values stored in it nest-bounded."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - as Namespace
        Namespace.__init__(*args, **kwargs)
        _check_nesting(object.__getattribute__(args[0], "_Namespace__attrs"))

    def __setitem__(self, name: str, value: Any) -> None:
        _check_nesting(value)
        Namespace.__setitem__(self, name, value)


def _namespace_attrs(ns: Any) -> Any:
    return object.__getattribute__(ns, "_Namespace__attrs")


TEXT_EXPANDERS[Namespace] = TEXT_EXPANDERS[_Namespace] = _namespace_attrs  # repr shows them


# -- str.format ------------------------------------------------------------------

_NUMBER = re.compile(r"\d+")


def _field_size(value: Any, spec: str) -> int:
    if not spec:
        return text_size(value, MAX_OUTPUT_CHARS)
    numbers = [int(d) if len(d) < 10 else 10**10 for d in _NUMBER.findall(spec)]
    if type(value) is int:
        base = value.bit_length() * 4 // 3 + 4  # {:_b}
    else:
        base = text_size(value, MAX_OUTPUT_CHARS)
    return base + sum(numbers) + 12 * len(spec) + 340  # float digits, date's %c


class _BoundedFormatting(SandboxedFormatter):
    """Jinja's sandboxed formatters (the escaping one too, below): each field is
    bounded before it is formatted, and the fields of one call together."""

    escape_factor = 1

    def __init__(self, env: Any, **kwargs: Any) -> None:
        super().__init__(env, **kwargs)
        self.spent = 0

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if conversion in ("r", "a"):
            mode = REPR if conversion == "r" else ASCII
            if text_size(value, MAX_OUTPUT_CHARS, mode) > MAX_OUTPUT_CHARS:
                raise _refuse(f"format(): field larger than {MAX_OUTPUT_CHARS:,} characters")
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> Any:
        self.spent += self.escape_factor * _field_size(value, format_spec)
        if self.spent > MAX_OUTPUT_CHARS:
            raise _refuse(f"format() result larger than {MAX_OUTPUT_CHARS:,} characters")
        return super().format_field(value, format_spec)


class _Formatter(_BoundedFormatting):
    pass


class _EscapeFormatter(_BoundedFormatting, SandboxedEscapeFormatter):
    escape_factor = _ESCAPED


# -- operators -------------------------------------------------------------------


def _check_product(left: Any, right: Any) -> None:
    if type(left) is int and type(right) is int:
        if left.bit_length() + right.bit_length() > MAX_POWER_BITS:
            raise SecurityError("product too large")
        return
    for seq, times in ((left, right), (right, left)):
        if isinstance(seq, str | bytes | list | tuple) and isinstance(times, int):
            if len(seq) * times > MAX_PRODUCT_ITEMS:
                raise SecurityError(f"sequence repetition larger than {MAX_PRODUCT_ITEMS}")


def _check_power(base: Any, exponent: Any) -> None:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if max(base.bit_length(), 1) * exponent > MAX_POWER_BITS:
            raise SecurityError("power too large")


def _check_sum(left: Any, right: Any) -> None:
    sized = (str, bytes, list, tuple)
    if isinstance(left, sized) and isinstance(right, sized):
        factor = _ESCAPED if isinstance(left, Markup) or isinstance(right, Markup) else 1
        limit = MAX_OUTPUT_CHARS if isinstance(left, str | bytes) else MAX_PRODUCT_ITEMS
        if factor * (len(left) + len(right)) > limit:
            raise SecurityError(f"'+' result larger than {limit:,}")


def _check_percent(left: Any, right: Any) -> None:
    if isinstance(left, str | bytes):
        factor = _ESCAPED if isinstance(left, Markup) else 1
        if factor * percent_size(left, right, MAX_OUTPUT_CHARS) > MAX_OUTPUT_CHARS:
            raise SecurityError(f"'%' result larger than {MAX_OUTPUT_CHARS:,} characters")


_BINOP_CHECKS = {"*": _check_product, "**": _check_power, "+": _check_sum, "%": _check_percent}


class _CodeGenerator(CodeGenerator):
    @optimizeconst
    def visit_Concat(self, node: Any, frame: Any) -> None:
        # As Jinja's, with the operands' text bounded before they are joined.
        if frame.eval_ctx.volatile:
            func_name = "(markup_join if context.eval_ctx.volatile else str_join)"
        elif frame.eval_ctx.autoescape:
            func_name = "markup_join"
        else:
            func_name = "str_join"
        self.write(f"{func_name}(environment.checked_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write(")))")


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(_BINOP_CHECKS)
    code_generator_class = _CodeGenerator
    concat = staticmethod(_capped_concat)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(finalize=_finalize, **kwargs)
        self.filters.update(_BOUNDED_FILTERS)
        self.globals.pop("lipsum", None)  # lipsum(n=10**9): a loop building n paragraphs
        self.globals["namespace"] = _Namespace

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        return (attr not in UNSAFE_ATTRS and not reads_clock(obj, attr)
                and super().is_safe_attribute(obj, attr, value))

    def is_safe_callable(self, obj: Any) -> bool:
        if getattr(obj, "__name__", None) in UNSAFE_ATTRS:  # e.g. ZoneInfo.clear_cache
            return False
        return super().is_safe_callable(obj)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # The default returns an Undefined that only raises when used; with
        # ChainableUndefined, ``''.__class__.__mro__`` would render "" silently.
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _BINOP_CHECKS[operator](left, right)
        return super().call_binop(context, operator, left, right)

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Calls from templates: string (and date) methods that can grow text are
        bounded with their arguments first (rules.guards.check_text_call)."""
        name = getattr(obj, "__name__", None)
        if name in TEXT_CALLS:
            owner = getattr(obj, "__self__", None)
            if isinstance(owner, str | bytes | date | time):
                args = _bounded(check_text_call, owner, name, args, kwargs, MAX_OUTPUT_CHARS)
        return super().call(context, obj, *args, **kwargs)

    def checked_concat(self, parts: tuple[Any, ...]) -> tuple[Any, ...]:
        """``a ~ b``: the operands' text is bounded before it is built and joined."""
        factor = _ESCAPED if self.autoescape else 1
        total = 0
        for p in parts:
            total += factor * (len(p) if type(p) is str else text_size(p, MAX_OUTPUT_CHARS))
            if total > MAX_OUTPUT_CHARS:
                raise _refuse(f"'~' result larger than {MAX_OUTPUT_CHARS:,} characters")
        return parts

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        # As Jinja's (which routes str.format/format_map through its sandboxed
        # formatter), with the fields bounded.
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        f_self: str = value.__self__  # a str (or Markup): Jinja wraps only their methods
        is_format_map = value.__name__ == "format_map"
        make: Callable[[], _BoundedFormatting]
        if isinstance(f_self, Markup):
            make = lambda: _EscapeFormatter(self, escape=f_self.escape)  # noqa: E731
        else:
            make = lambda: _Formatter(self)  # noqa: E731
        str_type = type(f_self)

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                mapping = args[0]
                args, kwargs = (), mapping
            return str_type(make().vformat(f_self, args, kwargs))

        return functools.update_wrapper(wrapper, value)


# -- filters -----------------------------------------------------------------------


# (value, args, kwargs): what a bounded filter is called with
_FilterCall = tuple[Any, tuple[Any, ...], dict[str, Any]]


def _filter(name: str, check: Callable[..., _FilterCall]) -> Callable[..., Any]:
    """Jinja's filter ``name``, with ``check(ctx, value, *args, **kwargs)`` run first;
    it returns the (value, args, kwargs) to call the filter with (a one-shot iterable comes
    back as a list). ``ctx``: the environment/eval context the filter is passed, or
    None."""
    orig = FILTERS[name]
    passes = getattr(orig, "jinja_pass_arg", None) is not None

    @functools.wraps(orig)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        if passes:
            ctx, value, rest = args[0], args[1], args[2:]
            value, rest, kwargs = check(ctx, value, *rest, **kwargs)
            return orig(ctx, value, *rest, **kwargs)
        value, rest, kwargs = check(None, args[0], *args[1:], **kwargs)
        return orig(value, *rest, **kwargs)

    return bounded


def _text_filter(factor: int) -> Callable[..., _FilterCall]:
    def check(ctx: Any, value: Any, *args: Any, **kwargs: Any) -> _FilterCall:
        _check_text(value, factor)
        return value, args, kwargs

    return check


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _autoescape(ctx: Any) -> bool:
    return bool(getattr(ctx, "autoescape", False))


def _check_center(ctx: Any, value: Any, *args: Any, **kwargs: Any) -> _FilterCall:
    width = _arg(args, kwargs, 0, "width", 80)
    if isinstance(width, int) and width > MAX_OUTPUT_CHARS:
        raise _refuse(f"center() width over {MAX_OUTPUT_CHARS:,}")
    _check_text(value)
    return value, args, kwargs


def _check_format(ctx: Any, value: Any, *args: Any, **kwargs: Any) -> _FilterCall:
    _check_text(value)
    _check_percent(str(value), kwargs or args)
    return value, args, kwargs


def _check_indent(ctx: Any, value: Any, *args: Any, **kwargs: Any) -> _FilterCall:
    width = _arg(args, kwargs, 0, "width", 4)
    if isinstance(width, str):
        step = _check_text(width)
    else:
        step = width if isinstance(width, int) else 0
        if step > MAX_OUTPUT_CHARS:
            raise _refuse(f"indent() width over {MAX_OUTPUT_CHARS:,}")
    size = _check_text(value)
    lines = str(value).count("\n") + 2
    if size + lines * max(step, 0) > MAX_OUTPUT_CHARS:
        raise _refuse(f"indent() result larger than {MAX_OUTPUT_CHARS:,} characters")
    return value, args, kwargs


def _check_wordwrap(ctx: Any, value: Any, *args: Any, **kwargs: Any) -> _FilterCall:
    wrap = _arg(args, kwargs, 2, "wrapstring", None)
    size = _check_text(value)
    step = _check_text(wrap) if wrap is not None else 2
    if size + (size + 1) * step > MAX_OUTPUT_CHARS:  # at most a line per character
        raise _refuse(f"wordwrap() result larger than {MAX_OUTPUT_CHARS:,} characters")
    return value, args, kwargs


def _check_truncate(ctx: Any, value: Any, *args: Any, **kwargs: Any) -> _FilterCall:
    _check_text(_arg(args, kwargs, 2, "end", "..."))
    return value, args, kwargs


def _check_join(ctx: Any, value: Any, *args: Any, **kwargs: Any) -> _FilterCall:
    sep = _arg(args, kwargs, 0, "d", "")
    attribute = _arg(args, kwargs, 1, "attribute", None)
    items = list(value)
    if attribute is not None:  # applied here: the filter gets the values
        items = list(map(make_attrgetter(ctx.environment, attribute), items))
        args, kwargs = (sep,), {}
    factor = _ESCAPED if _autoescape(ctx) else 1
    total = _check_text(sep) * max(len(items) - 1, 0)
    for item in items:
        total += len(item) if type(item) is str else text_size(item, MAX_OUTPUT_CHARS)
        if factor * total > MAX_OUTPUT_CHARS:
            raise _refuse(f"join() result larger than {MAX_OUTPUT_CHARS:,} characters")
    return items, args, kwargs


def _check_replace(ctx: Any, value: Any, *args: Any, **kwargs: Any) -> _FilterCall:
    old = _arg(args, kwargs, 0, "old", "")
    new = _arg(args, kwargs, 1, "new", "")
    count = _arg(args, kwargs, 2, "count", None)
    factor = _ESCAPED if _autoescape(ctx) else 1
    for x in (value, old, new):
        _check_text(x, factor)
    text = str(value)
    rest = (str(old), factor * str(new), -1 if count is None else count)
    _bounded(check_text_call, text, "replace", rest, {}, MAX_OUTPUT_CHARS)
    return value, args, kwargs


def _check_urlize(ctx: Any, value: Any, *args: Any, **kwargs: Any) -> _FilterCall:
    size = _check_text(value, 12)
    extra = 64
    for x in (_arg(args, kwargs, 2, "target", None), _arg(args, kwargs, 3, "rel", None)):
        if x is not None:
            extra += _check_text(x)
    if 12 * size + (size // 2 + 1) * extra > MAX_OUTPUT_CHARS:  # every word a link
        raise _refuse(f"urlize() result larger than {MAX_OUTPUT_CHARS:,} characters")
    return value, args, kwargs


def _check_tojson(ctx: Any, value: Any, *args: Any, **kwargs: Any) -> _FilterCall:
    if _arg(args, kwargs, 0, "indent", None) is not None:
        raise _refuse("tojson(indent=...) is not available")
    limit = MAX_OUTPUT_CHARS // 12  # \ud83d\ude00 for a character of ascii()'s \U0001f600
    if text_size(value, limit, ASCII) > limit:
        raise _refuse(f"tojson() result larger than {MAX_OUTPUT_CHARS:,} characters")
    return value, args, kwargs


def _check_fill(name: str, limit: int) -> Callable[..., _FilterCall]:
    def check(ctx: Any, value: Any, *args: Any, **kwargs: Any) -> _FilterCall:
        n = _arg(args, kwargs, 0, name, 0)
        filled = name == "slices" or _arg(args, kwargs, 1, "fill_with", None) is not None
        if filled and isinstance(n, int) and n > limit:
            raise _refuse(f"{name} over {limit:,}")
        return value, args, kwargs

    return check


def _check_sum_start(ctx: Any, value: Any, *args: Any, **kwargs: Any) -> _FilterCall:
    start = _arg(args, kwargs, 1, "start", 0)
    if type(start) not in (int, float, bool):
        raise _refuse("sum() start must be a number")  # sum(lists, []) is quadratic
    return value, args, kwargs


def _check_round(ctx: Any, value: Any, *args: Any, **kwargs: Any) -> _FilterCall:
    precision = _arg(args, kwargs, 0, "precision", 0)
    if isinstance(precision, int) and abs(precision) > MAX_ROUND_DIGITS:
        raise _refuse(f"round() precision must be within ±{MAX_ROUND_DIGITS}")
    return value, args, kwargs


def _unavailable(name: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise _refuse(f"the {name} filter is not available")

    return refuse


# fmt: off
_BOUNDED_FILTERS: dict[str, Callable[..., Any]] = {
    **{
        name: _filter(name, _text_filter(factor))
        for name, factor in {
            "upper": 3, "lower": 2, "title": 3, "capitalize": 3, "trim": 1,
            "striptags": 1, "wordcount": 1, "string": 1, "safe": 1, "e": _ESCAPED,
            "escape": _ESCAPED, "forceescape": _ESCAPED, "urlencode": 12,
            "xmlattr": _ESCAPED,
        }.items()
    },
    "center": _filter("center", _check_center),
    "format": _filter("format", _check_format),
    "indent": _filter("indent", _check_indent),
    "wordwrap": _filter("wordwrap", _check_wordwrap),
    "truncate": _filter("truncate", _check_truncate),
    "join": _filter("join", _check_join),
    "replace": _filter("replace", _check_replace),
    "urlize": _filter("urlize", _check_urlize),
    "tojson": _filter("tojson", _check_tojson),
    "batch": _filter("batch", _check_fill("linecount", MAX_FILL)),
    "slice": _filter("slice", _check_fill("slices", MAX_FILL)),
    "sum": _filter("sum", _check_sum_start),
    "round": _filter("round", _check_round),
    "pprint": _unavailable("pprint"),  # nested values indented by their keys' widths
}
# fmt: on


def _environment(autoescape: bool) -> _Sandbox:
    return _Sandbox(
        autoescape=autoescape,
        undefined=ChainableUndefined,
        keep_trailing_newline=True,
        auto_reload=False,
    )


_TEXT = _environment(autoescape=False)
_HTML = _environment(autoescape=True)


@lru_cache(maxsize=CACHE_SIZE)
def _text_template(source: str) -> Template:
    return _TEXT.from_string(source)


@lru_cache(maxsize=CACHE_SIZE)
def _html_template(source: str) -> Template:
    return _HTML.from_string(source)


def clear_cache() -> None:
    _text_template.cache_clear()
    _html_template.cache_clear()


# -- public --------------------------------------------------------------------

def render_template(source: str, /, **context: Any) -> str:
    """Render a plain-text template (no escaping). ChannelError on any failure."""
    return _render(_text_template, source, context)


def render_html(source: str, /, **context: Any) -> str:
    """Render an HTML template, autoescaping values. ChannelError on any failure."""
    return _render(_html_template, source, context)


def validate_template(source: str) -> str | None:
    """``"line N: reason"`` if ``source`` does not compile, else None.

    A mapping (a spec's ``translations`` or ``push`` part) is checked value by
    value: ``"en: title: line N: reason"``; ``None`` values in it are skipped.
    """
    if isinstance(source, Mapping):
        for key, value in source.items():
            if value is None:
                continue
            error = validate_template(value)
            if error is not None:
                return f"{key}: {error}"
        return None
    if not isinstance(source, str):
        return f"template must be a string, not {type(source).__name__}"
    try:
        _html_template(source)
    except TemplateSyntaxError as exc:
        return _syntax_message(exc)
    except TemplateError as exc:  # pragma: no cover - compile errors are syntax errors
        return str(exc)
    return None


@overload
def render_content(spec: Mapping[str, Any], profile: Any, ctx: Any = None) -> dict[str, Any]: ...
@overload
def render_content(spec: None, profile: Any, ctx: Any = None) -> None: ...
@overload
def render_content(
    spec: Mapping[str, Any] | None, profile: Any, ctx: Any = None
) -> dict[str, Any] | None: ...
def render_content(
    spec: Mapping[str, Any] | None, profile: Any, ctx: Any = None
) -> dict[str, Any] | None:
    """Render every string value of a content spec for one user.

    ``spec`` is ``{"title", "body", "link"}`` (a banner) or ``{"subject", "text",
    "html"}`` (an e-mail); ``html`` is autoescaped, the rest is plain text, and
    non-string values are copied as they are. Templates see every key of ``ctx``
    (a mapping, or anything ``{**ctx}`` spreads, such as :class:`rules.context.Context`)
    and ``profile`` (which wins over a ``ctx`` key of that name). None -> None.
    ChannelError names the key and line of the first failure.
    """
    if spec is None:
        return None
    context = {**(ctx or {}), "profile": profile}
    rendered: dict[str, Any] = {}
    for key, value in spec.items():
        if not isinstance(value, str):
            rendered[key] = value
            continue
        compile_ = _html_template if key in HTML_KEYS else _text_template
        try:
            rendered[key] = _render(compile_, value, context)
        except ChannelError as exc:
            raise ChannelError(f"{key}: {exc}") from exc.__cause__
    return rendered


def validate_content(spec: Mapping[str, Any] | None) -> str | None:
    """``"key: line N: reason"`` for the first string value that does not compile."""
    for key, value in (spec or {}).items():
        if isinstance(value, str):
            error = validate_template(value)
            if error is not None:
                return f"{key}: {error}"
    return None


# -- internals -----------------------------------------------------------------

def _render(
    compile_: Callable[[str], Template], source: str, context: Mapping[str, Any]
) -> str:
    try:
        template = compile_(source)
    except TemplateSyntaxError as exc:
        raise ChannelError(f"template error: {_syntax_message(exc)}") from exc
    except TypeError as exc:  # source is not a string (or not hashable)
        raise ChannelError(f"template error: {exc}") from exc
    outer = getattr(_render_state, "spent", None)
    _render_state.spent = 0
    try:
        return _join_capped(template.generate(context))
    except ChannelError:
        raise
    except Exception as exc:  # sandbox, undefined, and whatever the template's code raised
        where = _runtime_line(exc)
        prefix = f"line {where}: " if where else ""
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, SecurityError):
            reason = f"sandbox: {reason}"
        elif not isinstance(exc, TemplateError):
            reason = f"{type(exc).__name__}: {reason}"
        raise ChannelError(f"template error: {prefix}{reason}") from exc
    finally:
        _render_state.spent = outer


def _join_capped(chunks: Iterator[str]) -> str:
    parts: list[str] = []
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > MAX_OUTPUT_CHARS:
            raise ChannelError(f"template error: output larger than {MAX_OUTPUT_CHARS} characters")
        parts.append(chunk)
    return "".join(parts)


def _syntax_message(exc: TemplateSyntaxError) -> str:
    return f"line {exc.lineno}: {exc.message}" if exc.lineno else str(exc.message)


def _runtime_line(exc: BaseException) -> int | None:
    """The template line of the innermost template frame in ``exc``'s traceback."""
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == _TEMPLATE_FILENAME:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line
