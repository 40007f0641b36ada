"""SMTP delivery with aiosmtplib over a small pool of persistent connections.

``SmtpMailer(url, mail_from, ...)`` where ``url`` is

* ``smtp://host[:port]``               plain SMTP (port 25 by default), no TLS;
* ``smtp://host[:port]?starttls=1``    upgrade with STARTTLS (port 587 by default);
* ``smtps://host[:port]``              implicit TLS (port 465 by default).

``user:password@`` in the URL is used when ``username``/``password`` are not given.

Up to ``concurrency`` connections are opened lazily and kept open between calls;
each sends one message at a time, and ``send_many`` fans its messages out over
them. Each message is rendered once (:func:`channels.mail.render_message`) and
sent as bytes with ``sendmail``; ``SMTPUTF8`` is asked for only when an address
needs it. A connection that breaks mid-message (server gone, idle-closed, timed out)
is reconnected once and the message sent again before the failure is reported;
that can only duplicate a message the server accepted but did not confirm, which
a transient result (and the caller's retry) would duplicate as well, and the
retry carries the same ``Message-ID``.

Classification (see :mod:`channels.mail`): 5xx to RCPT TO or to the message
data is permanent; 4xx, 552 at RCPT (RFC 5321 4.5.3.1.10), any refusal that is
not about this recipient or message (MAIL FROM, EHLO, login), connection and
timeout errors are transient. When a connection cannot be
opened, that worker stops; once no worker can connect, the messages not yet
tried are reported transient without waiting for a timeout each.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib

from base.errors import ChannelError, ConfigError
from channels.mail import Email, Mailer, SendResult, envelope_address, render_message

__all__ = ["SmtpEndpoint", "SmtpMailer", "parse_smtp_url"]

log = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True, slots=True)
class SmtpEndpoint:
    host: str
    port: int | None  # None: the default for the TLS mode
    implicit_tls: bool
    starttls: bool
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:
        scheme = "smtps" if self.implicit_tls else "smtp"
        port = f":{self.port}" if self.port else ""
        query = "?starttls=1" if self.starttls else ""
        return f"{scheme}://{self.host}{port}{query}"


def parse_smtp_url(url: str) -> SmtpEndpoint:
    """Parse ``smtp[s]://[user:pass@]host[:port][?starttls=1]``; ConfigError if wrong."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"smtp_url {url!r}: {exc}") from None
    if parts.scheme not in ("smtp", "smtps"):
        raise ConfigError(f"smtp_url {url!r}: scheme must be smtp or smtps")
    if not parts.hostname:
        raise ConfigError(f"smtp_url {url!r}: no host")
    if parts.path not in ("", "/"):
        raise ConfigError(f"smtp_url {url!r}: unexpected path {parts.path!r}")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - {"starttls"}
    if unknown:
        raise ConfigError(f"smtp_url {url!r}: unknown option(s) {sorted(unknown)}")
    starttls = False
    if "starttls" in query:
        value = query["starttls"][-1].lower()
        if value not in _TRUE | _FALSE:
            raise ConfigError(f"smtp_url {url!r}: starttls must be 1 or 0")
        starttls = value in _TRUE
    implicit_tls = parts.scheme == "smtps"
    if implicit_tls and starttls:
        raise ConfigError(f"smtp_url {url!r}: smtps is already TLS; drop starttls")
    return SmtpEndpoint(
        host=parts.hostname,
        port=port,
        implicit_tls=implicit_tls,
        starttls=starttls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


class SmtpMailer(Mailer):
    def __init__(
        self,
        url: str,
        mail_from: str,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 10.0,
        concurrency: int = 8,
        *,
        tls_context: ssl.SSLContext | None = None,
        local_hostname: str | None = None,
    ) -> None:
        if concurrency < 1:
            raise ConfigError(f"smtp_concurrency must be at least 1, got {concurrency}")
        if timeout <= 0:
            raise ConfigError(f"smtp_timeout_s must be positive, got {timeout}")
        self.endpoint = parse_smtp_url(url)
        self.mail_from = mail_from
        try:
            self._sender, self._domain = envelope_address(mail_from)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.username = username if username is not None else self.endpoint.username
        self.password = password if password is not None else self.endpoint.password
        self.timeout = timeout
        self.concurrency = concurrency
        self._tls_context = tls_context
        self._local_hostname = local_hostname
        self._idle: list[aiosmtplib.SMTP] = []
        self._slots = asyncio.Semaphore(concurrency)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"SmtpMailer({str(self.endpoint)!r}, concurrency={self.concurrency})"

    # -- public --------------------------------------------------------------
    async def send_many(self, emails: Sequence[Email]) -> list[SendResult]:
        if self._closed:
            raise ChannelError("SmtpMailer is closed")
        self._bind_loop()
        emails = list(emails)
        if not emails:
            return []
        results: list[SendResult | None] = [None] * len(emails)
        pending = deque(enumerate(emails))
        unreachable: list[str] = []

        async def worker() -> None:
            async with self._slots:
                if not pending:
                    return
                conn = self._idle.pop() if self._idle else self._new_connection()
                clean = False
                try:
                    while pending:
                        index, mail = pending.popleft()
                        result, reachable = await self._deliver_safely(conn, mail)
                        results[index] = result
                        if not reachable:
                            unreachable.append(result.error or "unreachable")
                            break
                    clean = True
                finally:
                    if not clean or self._closed:
                        conn.close()  # cancelled mid-transaction: its state is unknown
                    if not self._closed:
                        self._idle.append(conn)

        await asyncio.gather(*(worker() for _ in range(min(self.concurrency, len(emails)))))
        for index, mail in pending:  # every worker failed to connect
            results[index] = SendResult(mail, ok=False, error=f"not tried: {unreachable[-1]}")
        done = [r for r in results if r is not None]
        assert len(done) == len(emails)
        return done

    async def aclose(self) -> None:
        self._closed = True
        conns, self._idle = self._idle, []
        await asyncio.gather(*(self._quit(c) for c in conns))

    # -- internals -----------------------------------------------------------
    def _bind_loop(self) -> None:
        # Connections and the semaphore belong to one event loop. A mailer moved to
        # another loop (a second asyncio.run) starts over instead of hanging.
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:
                for conn in self._idle:
                    try:
                        conn.close()
                    except RuntimeError:  # its loop is closed already
                        pass
                self._idle = []
                self._slots = asyncio.Semaphore(self.concurrency)
            self._loop = loop

    def _new_connection(self) -> aiosmtplib.SMTP:
        ep = self.endpoint
        return aiosmtplib.SMTP(
            hostname=ep.host,
            port=ep.port,
            username=self.username,
            password=self.password,
            timeout=self.timeout,
            use_tls=ep.implicit_tls,
            start_tls=ep.starttls,
            tls_context=self._tls_context,
            local_hostname=self._local_hostname,
        )

    async def _connect(self, conn: aiosmtplib.SMTP) -> None:
        if self._local_hostname is None:
            # socket.getfqdn can be slow; aiosmtplib would look it up once per
            # connection object, this does it once per mailer.
            self._local_hostname = await asyncio.to_thread(socket.getfqdn)
        await conn.connect(local_hostname=self._local_hostname)

    async def _deliver_safely(
        self, conn: aiosmtplib.SMTP, mail: Email
    ) -> tuple[SendResult, bool]:
        try:
            return await self._deliver(conn, mail)
        except Exception as exc:  # a bug, not a delivery outcome: keep the batch going
            log.exception("unexpected error sending to %s", mail.to)
            conn.close()
            return SendResult(mail, ok=False, error=f"unexpected {type(exc).__name__}: {exc}"), True

    async def _deliver(self, conn: aiosmtplib.SMTP, mail: Email) -> tuple[SendResult, bool]:
        """(result, server reachable)."""
        try:
            msg = render_message(mail, self.mail_from, domain=self._domain)
        except (ValueError, TypeError, UnicodeError) as exc:
            return SendResult(mail, ok=False, permanent=True, error=f"invalid message: {exc}"), True

        for attempt in (1, 2):
            if not conn.is_connected:
                try:
                    await self._connect(conn)
                except (OSError, aiosmtplib.SMTPException) as exc:
                    conn.close()
                    error = f"cannot connect to {self.endpoint}: {_describe(exc)}"
                    return SendResult(mail, ok=False, error=error), False
            try:
                await conn.sendmail(
                    self._sender,
                    [msg.recipient],
                    msg.data,
                    mail_options=["SMTPUTF8"] if msg.smtputf8 else None,
                )
            except aiosmtplib.SMTPRecipientsRefused as exc:
                refused = exc.recipients[0]
                code = 452 if refused.code == 552 else refused.code
                return _reply(mail, code, refused.code, refused.message, "RCPT"), True
            except aiosmtplib.SMTPSenderRefused as exc:
                # The sender is refused, not the recipient: never permanent for them.
                self._drop_if_closing(conn, exc.code)
                error = f"MAIL FROM refused: {exc.code} {exc.message}"
                return SendResult(mail, ok=False, error=error), True
            except aiosmtplib.SMTPDataError as exc:  # the server refused this message
                self._drop_if_closing(conn, exc.code)
                return _reply(mail, exc.code, exc.code, exc.message, "DATA"), True
            except aiosmtplib.SMTPResponseException as exc:  # EHLO and the like: not theirs
                self._drop_if_closing(conn, exc.code)
                error = f"server refused: {exc.code} {exc.message}"
                return SendResult(mail, ok=False, error=error), True
            except aiosmtplib.SMTPNotSupported as exc:  # e.g. a UTF-8 address, no SMTPUTF8
                return SendResult(mail, ok=False, permanent=True, error=str(exc)), True
            except (OSError, aiosmtplib.SMTPException) as exc:
                # Disconnected, timed out, or a protocol error: the connection's state
                # is unknown. Reconnect once and send again.
                conn.close()
                if attempt == 1:
                    continue
                error = f"connection to {self.endpoint} failed: {_describe(exc)}"
                return SendResult(mail, ok=False, error=error), True
            return SendResult(mail, ok=True), True
        raise AssertionError("unreachable")

    @staticmethod
    def _drop_if_closing(conn: aiosmtplib.SMTP, code: int) -> None:
        if code == 421:  # "service not available, closing transmission channel"
            conn.close()

    async def _quit(self, conn: aiosmtplib.SMTP) -> None:
        try:
            if conn.is_connected:
                await conn.quit(timeout=min(self.timeout, 2.0))
        except (OSError, aiosmtplib.SMTPException):
            pass
        finally:
            conn.close()


def _reply(mail: Email, code: int, raw_code: int, message: str, stage: str) -> SendResult:
    permanent = 500 <= code <= 599
    return SendResult(mail, ok=False, permanent=permanent, error=f"{stage} {raw_code} {message}")


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text} ({cause})"
    return text
