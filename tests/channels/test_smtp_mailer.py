"""SmtpMailer against a real aiosmtpd server on loopback: pooling, failure
classification, reconnects, TLS and AUTH, URL parsing."""

from __future__ import annotations

import asyncio
import gc
import socket
import time
import warnings
from collections.abc import Iterator

import pytest

from base.errors import ChannelError, ConfigError
from channels.mail import Email
from channels.mailers.outbox import OutboxMailer
from channels.mailers.smtp import SmtpEndpoint, SmtpMailer, parse_smtp_url
from kvadrupel.factories import mailer_from_settings
from kvadrupel.settings import Settings
from tests.channels.helpers import (
    MAIL_FROM,
    client_tls_context,
    emails,
    send,
    server_tls_context,
)
from tests.fixtures.smtp import SmtpServer, make_smtp_server


def mailer(server: SmtpServer, **kwargs: object) -> SmtpMailer:
    options: dict = {"timeout": 5, "concurrency": 4, **kwargs}
    return SmtpMailer(server.url, MAIL_FROM, **options)


# -- pooling ----------------------------------------------------------------------

def test_fifty_messages_over_four_connections_arrive_exactly_once(
    smtp_server: SmtpServer,
) -> None:
    # Given 50 e-mails and a mailer with a pool of 4 connections
    batch = emails(50)

    # When they are sent in one batch
    results = send(lambda: mailer(smtp_server, concurrency=4), batch)

    # Then every one succeeded and arrived exactly once, over exactly 4 connections
    assert all(r.ok for r in results) and len(results) == 50
    received = smtp_server.wait_for(50)
    time.sleep(0.05)  # a duplicate would arrive right behind
    received = smtp_server.messages
    ids = [r.message["Message-ID"] for r in received]
    assert sorted(ids) == sorted(f"<m-{i}@kvadrupel.test>" for i in range(50))
    assert [r.rcpt_tos for r in received if r.message["Message-ID"] == "<m-7@kvadrupel.test>"] == [
        ("user7@example.com",)
    ]
    assert all(r.mail_from == "noreply@kvadrupel.test" for r in received)
    assert len({r.peer for r in received}) == 4


def test_connections_are_reused_across_batches(smtp_server: SmtpServer) -> None:
    # Given a mailer that already sent one batch
    async def go() -> None:
        async with mailer(smtp_server, concurrency=3) as m:
            first = await m.send_many(emails(9, prefix="a"))
            # When it sends a second batch
            second = await m.send_many(emails(9, prefix="b"))
            assert all(r.ok for r in first + second)

    asyncio.run(go())

    # Then the second batch went over the connections opened for the first
    received = smtp_server.wait_for(18)
    peers_a = {r.peer for r in received if r.message["Message-ID"].startswith("<a-")}
    peers_b = {r.peer for r in received if r.message["Message-ID"].startswith("<b-")}
    assert len(peers_a) == 3 and peers_b <= peers_a


def test_concurrent_batches_share_the_connection_limit(smtp_server: SmtpServer) -> None:
    # Given one mailer with 2 connections
    async def go() -> list[bool]:
        async with mailer(smtp_server, concurrency=2) as m:
            # When three batches are sent at the same time
            batches = await asyncio.gather(
                *(m.send_many(emails(5, prefix=p)) for p in "xyz")
            )
            return [r.ok for batch in batches for r in batch]

    oks = asyncio.run(go())

    # Then all 15 arrived, over no more than 2 connections
    assert oks == [True] * 15
    assert len({r.peer for r in smtp_server.wait_for(15)}) <= 2


# -- classification -----------------------------------------------------------------

@pytest.mark.parametrize(
    ("code", "at", "permanent"),
    [
        (451, "RCPT", False),
        (450, "RCPT", False),
        (552, "RCPT", False),  # RFC 5321 4.5.3.1.10: treat as 452
        (550, "RCPT", True),
        (553, "RCPT", True),
        (452, "DATA", False),
        (554, "DATA", True),
    ],
)
def test_refusals_are_classified_by_reply_code(
    smtp_server: SmtpServer, code: int, at: str, permanent: bool
) -> None:
    # Given a server that refuses with this code at this stage
    smtp_server.refuse(code=code, at=at)

    # When two e-mails are sent
    results = send(lambda: mailer(smtp_server), emails(2))

    # Then both failed, transient for 4xx and permanent for 5xx, with the reply in the error
    assert [(r.ok, r.permanent) for r in results] == [(False, permanent)] * 2
    assert all(r.error and str(code) in r.error and at in r.error for r in results)
    assert smtp_server.messages == []


def test_a_refused_recipient_does_not_spoil_the_connection(smtp_server: SmtpServer) -> None:
    # Given a server that refuses one address permanently
    smtp_server.refuse(code=550, addresses={"user1@example.com"})

    # When a batch with that address in the middle goes over a single connection
    results = send(lambda: mailer(smtp_server, concurrency=1), emails(3))

    # Then only that one failed (permanently); the others arrived over the same connection
    assert [(r.ok, r.permanent) for r in results] == [(True, False), (False, True), (True, False)]
    received = smtp_server.wait_for(2)
    assert [r.rcpt_tos for r in received] == [("user0@example.com",), ("user2@example.com",)]
    assert len({r.peer for r in received}) == 1


def test_server_back_to_accepting_delivers_again(smtp_server: SmtpServer) -> None:
    # Given a server that answered 451 to a first attempt
    smtp_server.refuse(code=451)
    first = send(lambda: mailer(smtp_server), emails(1))

    # When it accepts again and the caller retries
    smtp_server.accept()
    second = send(lambda: mailer(smtp_server), emails(1))

    # Then the retry arrived
    assert (first[0].ok, first[0].permanent, second[0].ok) == (False, False, True)
    assert len(smtp_server.wait_for(1)) == 1


def test_stopped_server_is_transient_and_fails_fast(smtp_server: SmtpServer) -> None:
    # Given a server that is not listening any more
    smtp_server.stop()

    # When 20 e-mails are sent over 4 connections
    started = time.monotonic()
    results = send(lambda: mailer(smtp_server, concurrency=4, timeout=5), emails(20))

    # Then every result is transient (cannot connect), without a timeout per message
    assert time.monotonic() - started < 2
    assert [(r.ok, r.permanent) for r in results] == [(False, False)] * 20
    assert [r.email.message_id for r in results] == [f"m-{i}" for i in range(20)]
    assert all("cannot connect" in (r.error or "") for r in results)


def test_a_silent_server_times_out_once_per_connection_not_per_message() -> None:
    # Given a port that accepts connections but never greets (nobody calls accept)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"smtp://127.0.0.1:{silent.getsockname()[1]}"

        # When 12 e-mails are sent over 3 connections with a 0.3 s timeout
        started = time.monotonic()
        results = send(lambda: SmtpMailer(url, MAIL_FROM, timeout=0.3, concurrency=3), emails(12))
        elapsed = time.monotonic() - started

    # Then all are transient after about one timeout, not twelve
    assert [(r.ok, r.permanent) for r in results] == [(False, False)] * 12
    assert all("cannot connect" in (r.error or "") for r in results)
    assert elapsed < 1.5


def test_a_connection_broken_mid_message_is_reconnected_once(smtp_server: SmtpServer) -> None:
    # Given a server that will drop the connection at the next MAIL FROM
    smtp_server.drop(1)

    # When one e-mail is sent
    results = send(lambda: mailer(smtp_server, concurrency=1), emails(1))

    # Then the mailer reconnected and the message arrived once
    assert results[0].ok
    received = smtp_server.wait_for(1)
    time.sleep(0.05)
    assert len(smtp_server.messages) == 1 == len(received)


def test_a_connection_broken_twice_is_transient(smtp_server: SmtpServer) -> None:
    # Given a server that drops the connection at the next two MAIL FROMs
    smtp_server.drop(2)

    # When two e-mails are sent over one connection
    results = send(lambda: mailer(smtp_server, concurrency=1), emails(2))

    # Then the first is transient (one reconnect only), the second goes through
    assert [(r.ok, r.permanent) for r in results] == [(False, False), (True, False)]
    assert "failed" in (results[0].error or "")
    assert [r.rcpt_tos for r in smtp_server.wait_for(1)] == [("user1@example.com",)]


def test_pooled_connections_survive_a_server_restart(smtp_server: SmtpServer) -> None:
    # Given a mailer with open connections to a server
    async def go() -> list[bool]:
        async with mailer(smtp_server, concurrency=2) as m:
            first = await m.send_many(emails(4, prefix="before"))
            # When the server restarts (on the same port) between two batches
            await asyncio.to_thread(smtp_server.stop)
            await asyncio.to_thread(smtp_server.start)
            second = await m.send_many(emails(4, prefix="after"))
            return [r.ok for r in first + second]

    # Then the second batch is delivered over new connections
    assert asyncio.run(go()) == [True] * 8
    assert len(smtp_server.wait_for(8)) == 8


def test_a_non_ascii_address_goes_out_with_smtputf8(smtp_server: SmtpServer) -> None:
    # Given a recipient whose address is not ASCII, and one with a Cyrillic name
    mails = [
        Email(to="анна@пример.рф", subject="Привет", text="Текст"),
        Email(to="Анна Иванова <anna@example.com>", subject="Привет", text="Текст"),
    ]

    # When they are sent to a server that speaks SMTPUTF8
    results = send(lambda: mailer(smtp_server, concurrency=1), mails)

    # Then both arrived, to the right envelope addresses, with names and subjects intact
    assert [r.ok for r in results] == [True, True]
    first, second = smtp_server.wait_for(2)
    assert first.rcpt_tos == ("анна@пример.рф",)
    assert second.rcpt_tos == ("anna@example.com",)
    assert second.message["To"].addresses[0].display_name == "Анна Иванова"
    assert first.message["Subject"] == second.message["Subject"] == "Привет"


def test_a_mailer_moved_to_a_new_event_loop_starts_over(smtp_server: SmtpServer) -> None:
    # Given a mailer whose connections were opened in an event loop that is gone
    m = mailer(smtp_server, concurrency=2)
    first = asyncio.run(m.send_many(emails(2, prefix="a")))

    # When it is used from a new event loop
    async def again() -> list[bool]:
        try:
            return [r.ok for r in await m.send_many(emails(2, prefix="b"))]
        finally:
            await m.aclose()

    # Then it opens new connections there instead of hanging on the old ones
    assert [r.ok for r in first] == [True, True]
    assert asyncio.run(again()) == [True, True]
    assert len(smtp_server.wait_for(4)) == 4
    # (the first loop's sockets could not be closed without it: collect them here)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def test_closed_mailer_refuses_to_send(smtp_server: SmtpServer) -> None:
    # Given a closed mailer
    async def go() -> None:
        m = mailer(smtp_server)
        await m.aclose()
        # When it is asked to send, Then it raises
        with pytest.raises(ChannelError, match="closed"):
            await m.send_many(emails(1))

    asyncio.run(go())


# -- TLS and AUTH ---------------------------------------------------------------------

@pytest.fixture
def tls_server() -> Iterator[SmtpServer]:
    server = make_smtp_server(ssl_context=server_tls_context())
    yield server
    server.stop()


@pytest.fixture
def starttls_server() -> Iterator[SmtpServer]:
    server = make_smtp_server(
        tls_context=server_tls_context(),
        require_starttls=True,
        credentials=("kvadrupel", "s3cret"),
    )
    yield server
    server.stop()


def test_smtps_url_uses_implicit_tls(tls_server: SmtpServer) -> None:
    # Given an smtps:// server with a certificate the client trusts
    assert tls_server.url.startswith("smtps://")

    # When an e-mail is sent
    results = send(lambda: mailer(tls_server, tls_context=client_tls_context()), emails(1))

    # Then it arrived
    assert results[0].ok
    assert len(tls_server.wait_for(1)) == 1


def test_starttls_with_login(starttls_server: SmtpServer) -> None:
    # Given a server that requires STARTTLS and AUTH
    assert starttls_server.url.endswith("?starttls=1")

    # When e-mails are sent with the right credentials
    results = send(
        lambda: mailer(
            starttls_server,
            username="kvadrupel",
            password="s3cret",
            tls_context=client_tls_context(),
        ),
        emails(3),
    )

    # Then they arrived
    assert all(r.ok for r in results)
    assert len(starttls_server.wait_for(3)) == 3


def test_wrong_password_is_transient_never_permanent(starttls_server: SmtpServer) -> None:
    # Given the wrong password
    make = lambda: mailer(  # noqa: E731
        starttls_server, username="kvadrupel", password="nope", tls_context=client_tls_context()
    )

    # When e-mails are sent
    results = send(make, emails(5))

    # Then they fail as transient (a configuration problem, not the recipients')
    assert [(r.ok, r.permanent) for r in results] == [(False, False)] * 5
    assert all("535" in (r.error or "") for r in results)
    assert starttls_server.messages == []


def test_plain_smtp_to_a_starttls_only_server_is_transient(starttls_server: SmtpServer) -> None:
    # Given a mailer that does not upgrade to TLS
    url = f"smtp://{starttls_server.host}:{starttls_server.port}"

    # When it sends
    results = send(lambda: SmtpMailer(url, MAIL_FROM, timeout=5), emails(2))

    # Then the server's refusal (530, must STARTTLS) is transient for both
    assert [(r.ok, r.permanent) for r in results] == [(False, False)] * 2
    assert all("530" in (r.error or "") for r in results)


# -- configuration ----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("smtp://mail.example.com", SmtpEndpoint("mail.example.com", None, False, False)),
        ("smtp://mail.example.com:2525", SmtpEndpoint("mail.example.com", 2525, False, False)),
        ("smtp://mx:587?starttls=1", SmtpEndpoint("mx", 587, False, True)),
        ("smtp://mx:25?starttls=0", SmtpEndpoint("mx", 25, False, False)),
        ("smtps://mx", SmtpEndpoint("mx", None, True, False)),
        ("smtps://u%40x:p%3Aw@mx:465/", SmtpEndpoint("mx", 465, True, False, "u@x", "p:w")),
    ],
)
def test_smtp_urls_parse(url: str, expected: SmtpEndpoint) -> None:
    # Given a valid URL / When it is parsed / Then host, port and TLS mode are as written
    assert parse_smtp_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "http://mx",
        "smtp://",
        "smtp://mx:notaport",
        "smtps://mx?starttls=1",
        "smtp://mx?starttls=maybe",
        "smtp://mx?tls=1",
        "smtp://mx/path",
    ],
)
def test_bad_smtp_urls_are_config_errors(url: str) -> None:
    # Given a wrong URL / When a mailer is built / Then it is a ConfigError
    with pytest.raises(ConfigError):
        SmtpMailer(url, MAIL_FROM)


def test_url_credentials_never_show_in_repr() -> None:
    # Given a URL with a password
    m = SmtpMailer("smtp://user:hunter2@mx:25", MAIL_FROM)

    # When the mailer is printed / Then the password is not in it, but is used
    assert "hunter2" not in repr(m) and "hunter2" not in str(m.endpoint)
    assert (m.username, m.password) == ("user", "hunter2")


def test_mailer_from_settings_picks_outbox_or_smtp(tmp_path) -> None:
    # Given settings without and with an SMTP URL
    embedded = Settings(data_dir=tmp_path, smtp_url="")
    production = Settings(
        data_dir=tmp_path,
        smtp_url="smtp://mx.example.com:587?starttls=1",
        smtp_username="u",
        smtp_password="p",
        smtp_timeout_s=3.5,
        smtp_concurrency=5,
        mail_from="Ops <ops@example.com>",
    )

    # When mailers are built from them
    outbox = mailer_from_settings(embedded)
    smtp = mailer_from_settings(production)

    # Then the embedded one writes to data_dir/outbox and the other speaks SMTP as configured
    assert isinstance(outbox, OutboxMailer) and outbox.directory == tmp_path / "outbox"
    assert isinstance(smtp, SmtpMailer)
    assert smtp.endpoint == SmtpEndpoint("mx.example.com", 587, False, True)
    assert (smtp.username, smtp.password, smtp.timeout, smtp.concurrency) == ("u", "p", 3.5, 5)
    assert smtp.mail_from == "Ops <ops@example.com>"


def test_single_send_helper(smtp_server: SmtpServer) -> None:
    # Given one e-mail
    mail = Email(to="solo@example.com", subject="s", text="t")

    # When it is sent with Mailer.send
    async def go():
        async with mailer(smtp_server) as m:
            return await m.send(mail)

    # Then its single result comes back
    assert asyncio.run(go()).ok
