"""Notification templates: sandboxed Jinja2, autoescaped HTML, lenient profiles."""

from __future__ import annotations

import tracemalloc

import pytest

from base.errors import ChannelError
from rules import templates
from rules.context import make_context
from rules.templates import (
    render_content,
    render_html,
    render_template,
    validate_content,
    validate_template,
)

HOSTILE = '<script>alert("x")</script>&'


def test_html_autoescapes_profile_values() -> None:
    # Given a profile value with markup in it
    profile = {"name": HOSTILE}

    # When it is rendered into HTML and into text
    html = render_html("<p>Hello {{ profile.name }}</p>", profile=profile)
    text = render_template("Hello {{ profile.name }}", profile=profile)

    # Then the HTML has it escaped, the text has it as it is
    assert html == "<p>Hello &lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&amp;</p>"
    assert "<script>" not in html
    assert text == f"Hello {HOSTILE}"


def test_sandbox_refuses_internals() -> None:
    # Given templates that reach for Python internals
    attacks = [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ profile.__class__ }}",
        "{{ cycler.__init__.__globals__ }}",
    ]
    for source in attacks:
        # When each is rendered / Then it is refused as unsafe, not rendered empty
        with pytest.raises(ChannelError, match="unsafe") as info:
            render_template(source, profile={"a": 1})
        assert "line 1" in str(info.value)


def test_sandbox_is_immutable() -> None:
    # Given a template that tries to change the profile
    profile = {"tier": "free"}

    # When it is rendered / Then it is refused, and the profile is unchanged
    with pytest.raises(ChannelError, match="unsafe"):
        render_template("{{ profile.update({'tier': 'gold'}) }}", profile=profile)
    assert profile == {"tier": "free"}


@pytest.mark.parametrize(
    "source",
    [
        "{{ 'x' * 10000000 }}",
        "{{ [1] * 10000000 }}",
        "{{ 9 ** 9999999 }}",
        "{% for i in range(100000) %}{% for j in range(100) %}xxxxxxxxxx{% endfor %}{% endfor %}",
    ],
)
def test_sandbox_caps_memory(source: str) -> None:
    # Given a template that would build a huge value / When rendered / Then it is refused
    with pytest.raises(ChannelError):
        render_template(source)


def test_missing_fields_render_empty() -> None:
    # Given a profile without the fields a template uses
    profile = {"name": "Ann"}

    # When it is rendered
    text = render_template(
        "{{ profile.name }}|{{ profile.city }}|{{ profile.address.street.number }}|{{ nope }}",
        profile=profile,
    )

    # Then the missing ones are empty and nothing raised
    assert text == "Ann|||"
    assert render_html("<b>{{ profile.address.city }}</b>", profile=profile) == "<b></b>"


def test_missing_fields_still_fail_in_arithmetic_with_the_line() -> None:
    # Given a template that does arithmetic with a missing field on line 3
    source = "Hello\n{{ profile.name }}\n{{ profile.points + 10 }}"

    # When it is rendered / Then the error names line 3
    with pytest.raises(ChannelError, match=r"line 3: .*points"):
        render_template(source, profile={"name": "Ann"})


def test_runtime_errors_become_channel_errors_with_the_line() -> None:
    # Given a template that divides by zero on line 2
    with pytest.raises(ChannelError, match=r"line 2: ZeroDivisionError"):
        render_template("a\n{{ 1 / profile.zero }}", profile={"zero": 0})


def test_syntax_error_gives_the_line() -> None:
    # Given a template with a syntax error on line 3
    source = "Hello {{ profile.name }}\n{% if profile.vip %}\nGold {{ profile.name }\n{% endif %}"

    # When it is validated, and when it is rendered anyway
    message = validate_template(source)
    with pytest.raises(ChannelError) as info:
        render_template(source, profile={})

    # Then both say line 3
    assert message is not None and message.startswith("line 3: ")
    assert "line 3: " in str(info.value)


@pytest.mark.parametrize(
    ("source", "line"),
    [
        ("{% for x in y %}", 1),
        ("ok\n{{ x | no_such_filter }}", 2),
        ("ok\nok\n{% endif %}", 3),
        ("{{ }}", 1),
    ],
)
def test_validate_template_reports_each_kind_of_error(source: str, line: int) -> None:
    # Given a broken template / When validated / Then the message has its line
    message = validate_template(source)
    assert message is not None and message.startswith(f"line {line}: ")


def test_validate_template_accepts_good_templates() -> None:
    # Given valid templates / When validated / Then there is no message
    assert validate_template("Hi {{ profile.name | default('there') | title }}!") is None
    assert validate_template("{% for x in profile.tags %}{{ x }}{% endfor %}") is None
    assert validate_template(42) is not None  # type: ignore[arg-type]


def test_render_content_renders_an_email_spec() -> None:
    # Given an e-mail content spec and a profile with a hostile value
    spec = {
        "subject": "{{ profile.name }}, {{ event.kind }} at {{ rule.name }}",
        "text": "Hi {{ profile.name }}",
        "html": "<p>Hi {{ profile.name }}</p>",
        "priority": 3,
    }
    ctx = {"event": {"kind": "login"}, "rule": {"name": "welcome"}, "profile": "ignored"}

    # When it is rendered
    out = render_content(spec, {"name": HOSTILE}, ctx)

    # Then subject and text are plain, html is escaped, non-strings are copied
    assert out == {
        "subject": f"{HOSTILE}, login at welcome",
        "text": f"Hi {HOSTILE}",
        "html": "<p>Hi &lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&amp;</p>",
        "priority": 3,
    }
    assert spec["subject"].startswith("{{")  # the spec itself is untouched


def test_render_content_renders_a_banner_spec_and_none() -> None:
    # Given a banner spec
    spec = {"title": "Hi {{ profile.name }}", "body": "{{ profile.missing }}", "link": None}

    # When it is rendered, and when there is no spec
    out = render_content(spec, {"name": "Ann"}, None)

    # Then strings are rendered, the rest copied, and None stays None
    assert out == {"title": "Hi Ann", "body": "", "link": None}
    assert render_content(None, {"name": "Ann"}, {}) is None


def test_render_content_errors_name_the_key() -> None:
    # Given a spec whose html breaks on line 2
    spec = {"subject": "ok", "html": "ok\n{{ profile.n + 1 }}"}

    # When it is rendered / Then the error names the key and the line
    with pytest.raises(ChannelError, match=r"^html: template error: line 2: "):
        render_content(spec, {}, {})
    assert validate_content({"subject": "ok", "text": "a\n{% if %}"}) == (
        "text: line 2: Expected an expression, got 'end of statement block'"
    )
    assert validate_content(spec) is None and validate_content(None) is None


def test_compiled_templates_are_cached_by_source() -> None:
    # Given an empty cache
    templates.clear_cache()
    source = "Hello {{ profile.name }}"

    # When the same source is rendered for many users
    for i in range(100):
        assert render_template(source, profile={"name": str(i)}) == f"Hello {i}"

    # Then it was compiled once
    info = templates._text_template.cache_info()
    assert (info.misses, info.hits) == (1, 99)



# -- issue 14: sizes bounded before building, the rule sandbox's policy ---------------

BIG = "{% set s = 'a' * 100000 %}"
BOMBS = [
    "{{ '%900000000d' % 1 }}",
    "{{ 'a'|center(900000000) }}",
    "{{ '%900000000d'|format(1) }}",
    "{{ 'a'.center(900000000) }}",
    "{{ 'a'.ljust(900000000) }}",
    "{{ 'a'.zfill(900000000) }}",
    "{{ 'a'|indent(900000000, true) }}",
    "{{ ('a\\n' * 50000)|indent(100) }}",
    "{{ ('a ' * 50000)|wordwrap(1, wrapstring='x' * 100000) }}",
    "{{ '{:>900000000}'.format(1) }}",
    "{{ '{0}{0}{0}{0}{0}{0}{0}{0}{0}{0}{0}'.format('a' * 100000) }}",
    "{{ '{0!r}'.format(['a' * 100000] * 100000) }}",
    "{{ '{x}'.format_map({'x': ['a' * 100000] * 100000}) }}",
    "{{ (['a' * 100000] * 100000)|join(',') }}",
    "{{ ','.join(['a' * 100000] * 100000) }}",
    "{{ ['a' * 100000] * 100000 }}",
    "{{ (['a' * 100000] * 100000)|tojson }}",
    "{{ [1]|tojson(indent=900000000) }}",
    "{{ (['a' * 100000] * 100000)|string }}",
    "{{ (['a' * 100000] * 100000)|upper }}",
    "{{ (['a' * 100000] * 100000)|e }}",
    "{{ (['a' * 100000] * 100000)|safe }}",
    "{{ {'a': ['a' * 100000] * 100000}|xmlattr }}",
    "{{ (['a' * 100000] * 100000)|pprint }}",
    "{{ ['a' * 100000] * 100000 ~ 'x' }}",
    "{{ ('a' * 100000).replace('', 'b' * 100000) }}",
    "{{ ('a' * 100000)|replace('a', 'b' * 100000) }}",
    "{{ ('a' * 100000)|urlize(target='x' * 100000) }}",
    "{{ ('a\\t' * 50000).expandtabs(100000) }}",
    "{{ ('a' * 100000).translate({97: 'b' * 100000}) }}",
    "{% set s = '\\u0390' * 100000 %}{{ (s ~ s ~ s ~ s).upper() }}",
    "{{ ('a' * 100000).encode('unicode_escape') }}",
    "{{ ('%s' * 1000) % (('a' * 100000,) * 1000) }}",
    "{{ '%(x)s%(x)s%(x)s%(x)s%(x)s%(x)s%(x)s%(x)s%(x)s%(x)s%(x)s' % {'x': 'a' * 100000} }}",
    "{{ ctx.today.strftime('%c' * 50000) }}",
    "{{ lipsum(900000000) }}",
    "{{ [1]|batch(900000000, 'x')|list }}",
    "{{ [1]|slice(900000000)|list }}",
    "{{ ([[1] * 1000] * 1000)|sum(start=[]) }}",
    "{{ 5|round(-900000000) }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}{{ ns.s|length }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
    "{% endfor %}{{ ns.s|length }}",
    "{% set ns = namespace(x=2) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}"
    "{% endfor %}{{ ns.x > 0 }}",
    BIG + "{% set x %}{% for i in range(1000) %}{{ s }}{% endfor %}{% endset %}{{ x|length }}",
    BIG + "{% macro m() %}{% for i in range(100) %}{{ s }}{% endfor %}{% endmacro %}"
    "{{ m()|length }}",
    BIG + "{% filter upper %}{% for i in range(100) %}{{ s }}{% endfor %}{% endfilter %}",
    "{% set ns = namespace(l=[]) %}{% for i in range(30) %}{% set ns.l = [ns.l, ns.l] %}"
    "{% endfor %}{{ ns.l }}",
]


@pytest.mark.parametrize("source", BOMBS)
@pytest.mark.parametrize("render", [render_template, render_html], ids=["text", "html"])
def test_template_bombs_are_refused_before_building(source: str, render: object) -> None:
    # Given a template that would build hundreds of MB to GBs in one operation
    ctx = make_context("2024-05-10")

    # When it is rendered, with the memory of this process traced
    tracemalloc.start()
    try:
        with pytest.raises(ChannelError) as info:
            render(source, profile={}, ctx=ctx)  # type: ignore[operator]
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()

    # Then it is refused by the sandbox (or the name is not there), before building
    assert "sandbox:" in str(info.value) or "lipsum" in str(info.value), info.value
    assert peak < 48 * 2**20, f"peak {peak / 2**20:.0f} MB"


def test_template_refuses_the_methods_rules_may_not_call() -> None:
    # Given templates reaching ZoneInfo's cache methods and the like
    ctx = make_context("2024-05-10")
    for source in [
        "{{ ctx.now.tzinfo.clear_cache() }}",
        "{{ (ctx.now.tzinfo|attr('clear_cache'))() }}",
        "{{ ctx.now.tzinfo.no_cache('UTC') }}",
        "{{ ctx.now.tzinfo.from_file(none) }}",
        "{{ (1).to_bytes(900000000, 'big') }}",
        "{{ [ctx.now.tzinfo]|map(attribute='clear_cache')|list }}",
    ]:
        # When rendered / Then refused as unsafe
        with pytest.raises(ChannelError, match="unsafe"):
            render_template(source, ctx=ctx)


def test_namespace_values_cannot_nest_deep_enough_to_crash_hashing() -> None:
    # Given a template nesting a tuple 2,000 deep across loop iterations (hashing a
    # tuple some 100,000 deep crashes CPython; 2,000 is what the guard must refuse)
    source = (
        "{% set ns = namespace(t=()) %}{% for i in range(2000) %}{% set ns.t = (ns.t,) %}"
        "{% endfor %}{{ ns.t in {} }}"
    )
    # When rendered / Then refused, and the process still renders
    with pytest.raises(ChannelError, match="nested deeper than 100"):
        render_template(source)
    ok = "{% set ns = namespace(t=()) %}{% for i in range(50) %}{% set ns.t = (ns.t,) %}"
    assert render_template(ok + "{% endfor %}{{ ns.t in {} }}") == "False"


def test_ordinary_templates_still_render() -> None:
    # Given everyday uses of the operations the sandbox now bounds
    ctx = make_context("2024-05-10")
    source = (
        "{{ 'Hi %s, %d' % (profile.name, 3) }}|{{ '{} {:>4}'.format('a', 1) }}|"
        "{{ 'x'|center(5) }}|{{ profile.tags|join(', ') }}|{{ profile.name|upper }}|"
        "{{ ctx.today.strftime('%d.%m') }}|{{ 'a\nb'|indent(2) }}|{{ profile.tags|tojson }}|"
        "{{ users|join(',', attribute='n') }}|{{ 'x' ~ 1 ~ 'y' }}|{{ 3.14159|round(2) }}|"
        "{{ [1, 2, 3]|batch(2, 0)|list }}|{{ 'a b c'|wordwrap(3) }}|"
        "{{ 'abcdef'|truncate(5, end='.', leeway=0) }}|"
        "{{ 'a-b'|replace('-', '+') }}|{{ '%.2f'|format(2.5) }}|{{ ('ab' * 3)[:4] }}"
    )
    out = render_template(source, profile={"name": "Ann", "tags": ["a", "b"]}, ctx=ctx,
                          users=[{"n": "u"}, {"n": "v"}])
    assert out == (
        "Hi Ann, 3|a    1|  x  |a, b|ANN|10.05|a\n  b|[\"a\", \"b\"]|u,v|x1y|3.14|"
        "[[1, 2], [3, 0]]|a b\nc|abcd.|a+b|2.50|abab"
    )
    html = render_html("{{ x ~ '!' }} {{ '{}'.format(x) }}", x="<&>")
    assert html == "&lt;&amp;&gt;! &lt;&amp;&gt;"
