"""Jinja2 templates for notification content, sandboxed.

Rule authors write the subject/text/html of e-mails and the title/body/link of
banners as Jinja2 templates that see the user's ``profile`` (and the match
context). They are rendered per user per match, so:

* compiled templates are kept in an LRU cache keyed by source;
* rendering runs in :class:`jinja2.sandbox.ImmutableSandboxedEnvironment`: no
  dunder/internal attributes (an unsafe access raises instead of rendering
  empty), no mutation of the profile, ``range`` capped by Jinja, plus a cap on
  ``*``/``**`` results and on the output size, so a template cannot exhaust memory;
* a missing profile field renders empty (``ChainableUndefined``: ``{{
  profile.address.city }}`` is "" when there is no address), but *using* it in
  arithmetic or a comparison is an error;
* HTML is autoescaped (a ``<script>`` in a profile value arrives as text); plain
  text and subjects are not escaped.

Every failure is a :class:`~kvadrupel.errors.ChannelError` whose message says the
line. :func:`validate_template` / :func:`validate_content` give the same message
without raising, for checking a rule when it is saved.

Not bounded: the CPU time of a template that loops without producing output
(nested ``range`` loops, each up to 100,000): there is no deadline inside
rendering.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from functools import lru_cache
from typing import Any

from jinja2 import ChainableUndefined, Template, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from kvadrupel.errors import ChannelError

__all__ = [
    "CACHE_SIZE",
    "MAX_OUTPUT_CHARS",
    "clear_cache",
    "render_content",
    "render_html",
    "render_template",
    "validate_content",
    "validate_template",
]

CACHE_SIZE = 2048  # compiled templates kept per environment (text, html)
MAX_OUTPUT_CHARS = 1_000_000  # one rendered value
MAX_PRODUCT_ITEMS = 100_000  # "ab" * n, [x] * n
MAX_POWER_BITS = 100_000  # 2 ** n

# Keys of a content spec rendered as HTML (autoescaped); every other string value
# is rendered as plain text.
HTML_KEYS = frozenset({"html"})

_TEMPLATE_FILENAME = "<template>"


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # The default returns an Undefined that only raises when used; with
        # ChainableUndefined, ``''.__class__.__mro__`` would render "" silently.
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            _check_product(left, right)
        elif operator == "**":
            _check_power(left, right)
        return super().call_binop(context, operator, left, right)


def _check_product(left: Any, right: Any) -> None:
    for seq, times in ((left, right), (right, left)):
        if isinstance(seq, str | bytes | list | tuple) and isinstance(times, int):
            if len(seq) * times > MAX_PRODUCT_ITEMS:
                raise SecurityError(f"sequence repetition larger than {MAX_PRODUCT_ITEMS}")


def _check_power(base: Any, exponent: Any) -> None:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if max(base.bit_length(), 1) * exponent > MAX_POWER_BITS:
            raise SecurityError("power too large")


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
