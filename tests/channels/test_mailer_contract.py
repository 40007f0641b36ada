"""The Mailer contract, run over both implementations: the outbox folder and SMTP
against a real aiosmtpd server on loopback."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest

from channels.mail import Email, Mailer
from channels.mailers.outbox import OutboxMailer, read_outbox
from channels.mailers.smtp import SmtpMailer
from tests.channels.helpers import MAIL_FROM, emails, send


@dataclass
class Channel:
    name: str
    make: Callable[[], Mailer]
    received: Callable[[int], list[EmailMessage]]  # wait for at least n, return all


@pytest.fixture(params=["outbox", "smtp"])
def channel(request: pytest.FixtureRequest, tmp_path: Path) -> Channel:
    if request.param == "outbox":
        folder = tmp_path / "outbox"
        return Channel(
            "outbox",
            lambda: OutboxMailer(folder, MAIL_FROM),
            lambda n: read_outbox(folder),
        )
    server = request.getfixturevalue("smtp_server")
    return Channel(
        "smtp",
        lambda: SmtpMailer(server.url, MAIL_FROM, timeout=5, concurrency=4),
        lambda n: [r.message for r in server.wait_for(n)],
    )


def test_multipart_message_arrives_with_every_header(channel: Channel) -> None:
    # Given an e-mail with text, html, extra headers and an idempotency key
    mail = Email(
        to="Ann Example <ann@example.com>",
        subject="Your weekly digest — ünïcødé",
        text="Hello Ann,\nthree new items.\n",
        html="<p>Hello <b>Ann</b>, three new items.</p>\n",
        headers={"X-Kvadrupel-Rule": "42", "List-Unsubscribe": "<https://example.com/u/7>"},
        message_id="rule-42:user-7:2026-11-24",
    )

    # When it is sent
    results = send(channel.make, [mail])

    # Then it succeeded and arrived as multipart/alternative with every header
    assert [r.ok for r in results] == [True]
    assert results[0].email is mail and results[0].error is None
    (msg,) = channel.received(1)
    assert msg.get_content_type() == "multipart/alternative"
    assert msg["Subject"] == "Your weekly digest — ünïcødé"
    assert msg["From"] == MAIL_FROM
    assert msg["To"].addresses[0].addr_spec == "ann@example.com"
    assert msg["Message-ID"] == "<rule-42%3Auser-7%3A2026-11-24@kvadrupel.test>"
    assert msg["X-Kvadrupel-Rule"] == "42"
    assert msg["List-Unsubscribe"] == "<https://example.com/u/7>"
    assert msg["Date"] is not None and msg["Date"].datetime is not None
    text, html = (part for part in msg.iter_parts())
    assert text.get_content_type() == "text/plain"
    assert text.get_content() == "Hello Ann,\nthree new items.\n"
    assert html.get_content_type() == "text/html"
    assert html.get_content() == "<p>Hello <b>Ann</b>, three new items.</p>\n"


def test_text_only_message_is_a_single_text_part(channel: Channel) -> None:
    # Given an e-mail without html
    mail = Email(to="bob@example.com", subject="Plain", text="Just text")

    # When it is sent
    results = send(channel.make, [mail])

    # Then it arrives as one text/plain part with a generated Message-ID
    assert results[0].ok
    (msg,) = channel.received(1)
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content().rstrip("\n") == "Just text"
    assert msg["Message-ID"].startswith("<") and msg["Message-ID"].endswith("@kvadrupel.test>")


def test_results_are_in_order_and_a_bad_message_does_not_stop_the_batch(
    channel: Channel,
) -> None:
    # Given a batch where two messages can never be sent as they are
    batch = emails(3)
    bad_header = Email(
        to="c@example.com", subject="s", text="t", headers={"X-Note": "x\r\nBcc: evil@example.com"}
    )
    reserved = Email(to="d@example.com", subject="s", text="t", headers={"From": "x@evil.com"})
    two_recipients = Email(to="e@example.com, f@example.com", subject="s", text="t")
    mixed = [batch[0], bad_header, batch[1], reserved, two_recipients, batch[2]]

    # When the batch is sent
    results = send(channel.make, mixed)

    # Then each gets its own result, in order: the bad ones permanent, the rest delivered
    assert [r.email for r in results] == mixed
    assert [r.ok for r in results] == [True, False, True, False, False, True]
    for failed in (results[1], results[3], results[4]):
        assert failed.permanent and failed.error and "invalid message" in failed.error
    received = channel.received(3)
    assert sorted(m["Message-ID"] for m in received) == sorted(
        f"<m-{i}@kvadrupel.test>" for i in range(3)
    )


def test_line_breaks_in_a_subject_become_spaces_not_headers(channel: Channel) -> None:
    # Given a subject rendered from a profile value with line breaks in it
    mail = Email(to="ann@example.com", subject="Hello Ann\r\nBcc: evil@example.com\n", text="t")

    # When it is sent
    results = send(channel.make, [mail])

    # Then it arrives on one line, and no header was injected
    assert results[0].ok
    (msg,) = channel.received(1)
    assert msg["Subject"] == "Hello Ann Bcc: evil@example.com "
    assert msg["Bcc"] is None


def test_the_same_key_gives_the_same_message_id_on_a_resend(channel: Channel) -> None:
    # Given one e-mail with an idempotency key
    mail = Email(to="ann@example.com", subject="s", text="t", message_id="job-9/user-1")

    # When it is sent twice (a retry after a transient failure)
    send(channel.make, [mail])
    send(channel.make, [mail])

    # Then both copies carry the same Message-ID, so the receiver can drop one
    first, second = channel.received(2)
    assert first["Message-ID"] == second["Message-ID"] == "<job-9/user-1@kvadrupel.test>"


def test_an_empty_batch_sends_nothing(channel: Channel) -> None:
    # Given no e-mails
    # When an empty batch is sent
    results = send(channel.make, [])

    # Then there are no results and nothing arrived
    assert results == []
    assert channel.received(0) == []
