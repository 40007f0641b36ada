"""OutboxMailer: the embedded mailer writing .eml files, and message building."""

from __future__ import annotations

import asyncio
import email.message
import os
import re
from email import policy
from email.header import decode_header, make_header
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from channels.mail import Email, build_message, message_id_header, render_message
from channels.mailers.outbox import OutboxMailer, read_outbox
from tests.channels.helpers import MAIL_FROM, emails, send


def test_each_message_is_one_crlf_eml_file_named_by_time_and_id(tmp_path: Path) -> None:
    # Given an outbox folder that does not exist yet
    folder = tmp_path / "data" / "outbox"

    # When three e-mails are sent
    results = send(lambda: OutboxMailer(folder, MAIL_FROM), emails(3))

    # Then there are three .eml files, in send order, no temporary files left
    assert all(r.ok for r in results)
    names = sorted(os.listdir(folder))
    assert len(names) == 3 and all(n.endswith(".eml") for n in names)
    assert [n.split("-", 1)[1] for n in names] == [f"m-{i}@kvadrupel.test.eml" for i in range(3)]
    assert names[0][:8].isdigit() and names[0][8] == "T"
    raw = (folder / names[0]).read_bytes()
    assert b"\r\nSubject: Subject 0\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    assert [m["Message-ID"] for m in read_outbox(folder)] == [
        f"<m-{i}@kvadrupel.test>" for i in range(3)
    ]


def test_odd_message_ids_make_safe_file_names(tmp_path: Path) -> None:
    # Given an idempotency key full of characters that do not belong in a file name
    mail = Email(to="a@example.com", subject="s", text="t", message_id="../../etc/passwd ☃:*?")

    # When it is sent
    send(lambda: OutboxMailer(tmp_path, MAIL_FROM), [mail])

    # Then the file stays in the folder, its name made of safe characters only
    (path,) = tmp_path.iterdir()
    assert path.is_file() and path.suffix == ".eml"
    assert re.fullmatch(r"[0-9T.Z]+-[A-Za-z0-9._@+=-]+\.eml", path.name), path.name


def test_read_outbox_ignores_temporary_files_and_missing_folders(tmp_path: Path) -> None:
    # Given a folder with one message and a half-written temporary file
    send(lambda: OutboxMailer(tmp_path, MAIL_FROM), emails(1))
    (tmp_path / ".tmp-abc.eml").write_bytes(b"Subject: half")

    # When it is read, and a folder that does not exist is read
    messages = read_outbox(tmp_path)
    nothing = read_outbox(tmp_path / "nope")

    # Then only the complete message is returned, and nothing for the missing folder
    assert [m["Subject"] for m in messages] == ["Subject 0"]
    assert nothing == []


def test_unwritable_outbox_is_transient(tmp_path: Path) -> None:
    # Given an outbox path that is a file, not a folder
    blocker = tmp_path / "outbox"
    blocker.write_text("not a folder")

    # When an e-mail is sent
    results = send(lambda: OutboxMailer(blocker, MAIL_FROM), emails(2))

    # Then both are transient failures naming the outbox
    assert [(r.ok, r.permanent) for r in results] == [(False, False)] * 2
    assert all("outbox" in (r.error or "") for r in results)


def test_send_does_not_block_the_event_loop(tmp_path: Path) -> None:
    # Given a batch big enough to take a moment to write
    batch = emails(200)

    # When the loop also runs a ticker while the batch is written
    async def go() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        results = await OutboxMailer(tmp_path, MAIL_FROM, fsync=False).send_many(batch)
        task.cancel()
        assert all(r.ok for r in results)
        return ticks

    # Then the ticker ran while the files were written
    assert asyncio.run(go()) > 1


# -- message building (shared by both mailers) ------------------------------------

_KEYS = st.text(min_size=1, max_size=40).filter(
    lambda s: s.strip() == s and not s.startswith("<")
)
_MSGID = re.compile(r"<[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.]+@x\.test>")


@given(a=_KEYS, b=_KEYS)
def test_distinct_keys_give_distinct_valid_message_ids(a: str, b: str) -> None:
    # Given two idempotency keys
    # When each becomes a Message-ID
    ida, idb = message_id_header(a, "x.test"), message_id_header(b, "x.test")

    # Then they are well-formed ASCII, stable, and equal only for equal keys
    assert _MSGID.fullmatch(ida), ida
    assert message_id_header(a, "x.test") == ida
    assert (ida == idb) == (a == b)


def test_a_key_that_is_already_a_message_id_is_kept() -> None:
    # Given a key in Message-ID form / When it is used / Then it is kept as it is
    assert message_id_header("<abc@mail.example.com>", "x.test") == "<abc@mail.example.com>"


_WORDS = st.text(
    alphabet=st.characters(categories=("L", "N", "P", "S"), exclude_characters="\x85"),
    min_size=1,
    max_size=30,
)
_PHRASES = st.lists(_WORDS, min_size=1, max_size=12).map(" ".join)
_NAMES = st.lists(
    st.text(alphabet=st.characters(categories=("L", "N")), min_size=1, max_size=15),
    min_size=1,
    max_size=6,
).map(" ".join)
_BODIES = st.lists(
    st.text(alphabet=st.characters(categories=("L", "N", "P", "S", "Zs")), max_size=120),
    max_size=6,
).map("\n".join)


def _wire_and_parsed(mail: Email) -> tuple[bytes, EmailMessage, email.message.Message]:
    wire = render_message(mail, MAIL_FROM).data
    parsed = BytesParser(policy=policy.default).parsebytes(wire.replace(b"\r\n", b"\n"))
    raw = BytesParser(policy=policy.compat32).parsebytes(wire)
    return wire, parsed, raw


def _rfc2047_decoded(raw_value: str) -> str:
    # email.header follows RFC 2047 6.2 (white space between encoded words is
    # dropped); CPython's address parser keeps it, so it is not the reference here.
    return str(make_header(decode_header(re.sub(r"\r?\n(?=[ \t])", "", raw_value))))


@settings(max_examples=80, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    subject=_PHRASES,
    name=_NAMES,
    campaign=_PHRASES,
    text=_BODIES,
    html=st.none() | _BODIES,
)
def test_any_unicode_content_round_trips(
    subject: str, name: str, campaign: str, text: str, html: str | None
) -> None:
    # Given an e-mail with arbitrary Unicode subject, display name, header and bodies
    mail = Email(
        to=f"{name} <ann@example.com>",
        subject=subject,
        text=text,
        html=html,
        headers={"X-Kvadrupel-Campaign": campaign},
    )

    # When it is built and parsed back from its wire form
    wire, msg, raw = _wire_and_parsed(mail)

    # Then every header line fits 78 columns, the message is 7-bit, and everything
    # comes back as it was (set_content ends a body with a newline)
    head = wire.split(b"\r\n\r\n", 1)[0]
    assert all(len(line) <= 78 for line in head.split(b"\r\n")), head
    assert wire.isascii()
    assert msg["Subject"] == subject
    assert str(msg["X-Kvadrupel-Campaign"]) == campaign
    assert msg["To"].addresses[0].addr_spec == "ann@example.com"
    decoded_to = _rfc2047_decoded(raw["To"])
    assert decoded_to in (f"{name} <ann@example.com>", f'"{name}" <ann@example.com>')
    parts = list(msg.iter_parts()) if html is not None else [msg]
    assert parts[0].get_content() == _newline_terminated(text)
    if html is not None:
        assert parts[1].get_content() == _newline_terminated(html)


def test_a_long_russian_subject_keeps_its_spaces() -> None:
    # Given a subject the stdlib folder (Python 3.11) turns into "номер 100доставлен"
    subject = (
        "Анна, ваш заказ номер 100 доставлен сегодня в пункт выдачи на улице Ленина, "
        "заберите его до пятницы"
    )

    # When the message is built and parsed back
    _, msg, raw = _wire_and_parsed(Email(to="anna@example.com", subject=subject, text="t"))

    # Then the subject is intact, for the stdlib parser and for an RFC 2047 decoder
    assert msg["Subject"] == subject
    assert _rfc2047_decoded(raw["Subject"]) == subject


def test_build_message_gives_the_parsed_email_message() -> None:
    # Given an e-mail with text and html
    mail = Email(to="ann@example.com", subject="Привет", text="Текст", html="<b>Текст</b>")

    # When it is built as an EmailMessage
    msg = build_message(mail, MAIL_FROM)

    # Then it is the parsed wire form: multipart/alternative, decoded, LF line ends
    assert isinstance(msg, EmailMessage)
    assert msg.get_content_type() == "multipart/alternative"
    assert msg["Subject"] == "Привет"
    assert [p.get_content() for p in msg.iter_parts()] == ["Текст\n", "<b>Текст</b>\n"]
    assert all(p["Content-Transfer-Encoding"] == "quoted-printable" for p in msg.iter_parts())


def test_unparseable_recipients_are_value_errors() -> None:
    # Given recipients the stdlib address parser chokes on or reads as several
    for to in ["f j: :- dfe <a@example.com>", 'c -,g <a@example.com>', "no-at-sign", " "]:
        # When the message is built / Then it is a ValueError (a permanent result)
        with pytest.raises(ValueError):
            build_message(Email(to=to, subject="s", text="t"), MAIL_FROM)


def _newline_terminated(s: str) -> str:
    return s if s.endswith("\n") else s + "\n"


def test_a_body_is_7bit_only_when_ascii_printable_with_lines_of_at_most_998() -> None:
    # Given bodies at and around the limits of 7bit (RFC 5322: 998 characters a line)
    cases = {
        "a" * 998: "7bit",
        "short\n" + "a" * 998 + "\nend": "7bit",
        "tab\there": "7bit",
        "a" * 999: "quoted-printable",
        "short\n" + "a" * 999 + "\nend": "quoted-printable",
        "é": "quoted-printable",
        "bell\x07": "quoted-printable",
    }
    for body, cte in cases.items():
        # When each is rendered as the text part
        msg = build_message(Email(to="ann@example.com", subject="s", text=body), MAIL_FROM)

        # Then its encoding is the one it needs, and it reads back unchanged
        assert msg["Content-Transfer-Encoding"] == cte, body[:20]
        assert msg.get_content() == body + "\n"
