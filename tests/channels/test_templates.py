"""Notification templates: sandboxed Jinja2, autoescaped HTML, lenient profiles."""

from __future__ import annotations

import pytest

from channels import templates
from channels.templates import (
    render_content,
    render_html,
    render_template,
    validate_content,
    validate_template,
)
from kvadrupel.errors import ChannelError

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
