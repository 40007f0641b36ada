"""The e-mail channel interface.

Two implementations live in :mod:`channels.mailers`: ``outbox`` (the embedded
default: one ``.eml`` file per message under ``data_dir/outbox``) and ``smtp``
(aiosmtplib over a small pool of persistent connections).
:func:`mailer_from_settings` picks one: the outbox when ``smtp_url`` is empty.

Semantics every implementation keeps (and ``tests/channels`` checks on both):

* ``send_many`` returns one :class:`SendResult` per e-mail, in the order given. It
  never raises for a per-message failure; it classifies it instead:

  - ``ok=False, permanent=False`` (transient): retry later. Connection refused or
    lost, timeouts, 4xx replies, a refused sender or login.
  - ``ok=False, permanent=True``: do not retry this message. A 5xx reply for the
    recipient or for the message's data, or a message that cannot be built
    (a header with a line break, a reserved header in ``headers``).

* ``Email.message_id`` is the idempotency key. It becomes the ``Message-ID``
  header (see :func:`message_id_header`), so a message sent again after a transient
  failure carries the same ``Message-ID`` and the receiving side can drop the
  duplicate. Without one, a fresh ``Message-ID`` is generated per send.
* A message with ``html`` is ``multipart/alternative`` (text/plain, then
  text/html); without, it is a single text/plain part.
* A mailer belongs to one event loop; ``aclose`` releases its connections.
"""

from __future__ import annotations

import base64
import email.utils
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.headerregistry import Address, AddressHeader, UnstructuredHeader
from email.message import EmailMessage
from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:
    from kvadrupel.settings import Settings

__all__ = [
    "Email",
    "Mailer",
    "RESERVED_HEADERS",
    "SendResult",
    "build_message",
    "envelope_address",
    "mailer_from_settings",
    "message_id_header",
    "recipient_address",
]


# Headers an ``Email.headers`` entry may not set: they are built from the other
# fields (or from the mailer's configuration, for From) and the MIME structure.
RESERVED_HEADERS = frozenset(
    name.lower()
    for name in (
        "From", "Sender", "To", "Cc", "Bcc", "Subject", "Date", "Message-ID",
        "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
        "Content-Disposition", "Return-Path",
    )
)


@dataclass(frozen=True, slots=True)
class Email:
    to: str
    subject: str
    text: str
    html: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    message_id: str | None = None  # idempotency key; becomes the Message-ID header


@dataclass(frozen=True, slots=True)
class SendResult:
    email: Email
    ok: bool
    permanent: bool = False
    error: str | None = None


class Mailer(ABC):
    """Sends e-mails; see the module docstring for the contract."""

    @abstractmethod
    async def send_many(self, emails: Sequence[Email]) -> list[SendResult]:
        """Send every e-mail; one result per e-mail, in order. Never raises per message."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release connections. The mailer is not used afterwards."""

    async def send(self, email: Email) -> SendResult:
        return (await self.send_many([email]))[0]

    async def __aenter__(self) -> Mailer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def mailer_from_settings(settings: Settings) -> Mailer:
    """The outbox folder when ``smtp_url`` is empty, else SMTP."""
    if not settings.smtp_url:
        from channels.mailers.outbox import OutboxMailer

        return OutboxMailer(settings.data_dir / "outbox", settings.mail_from)

    from channels.mailers.smtp import SmtpMailer

    return SmtpMailer(
        settings.smtp_url,
        settings.mail_from,
        username=settings.smtp_username or None,
        password=settings.smtp_password or None,
        timeout=settings.smtp_timeout_s,
        concurrency=settings.smtp_concurrency,
    )


# -- message building, shared by the implementations ---------------------------

def envelope_address(mail_from: str) -> tuple[str, str]:
    """(``addr-spec``, domain) of a ``From`` value such as ``"Name <a@b.c>"``."""
    _, addr = email.utils.parseaddr(mail_from)
    if "@" not in addr:
        raise ValueError(f"mail_from {mail_from!r} has no address")
    return addr, addr.rpartition("@")[2]


_MSGID_RE = re.compile(r"^<[^<>@\s]+@[^<>@\s]+>$")
# RFC 5322 atext plus "."; everything else in a key is %-escaped, so distinct keys
# keep distinct Message-IDs.
_ATEXT_SAFE = "!#$&'*+-/=?^_`{|}~."


def message_id_header(key: str | None, domain: str) -> str:
    """The ``Message-ID`` for an idempotency key; a fresh one when ``key`` is None.

    A key that already is a message id (``<left@right>``) is used as it is; any
    other key becomes ``<escaped-key@domain>``, the same for the same key.
    """
    if key is None:
        return email.utils.make_msgid(domain=domain)
    key = key.strip()
    if _MSGID_RE.match(key):
        return key
    if not key:
        raise ValueError("message_id is empty")
    return f"<{quote(key, safe=_ATEXT_SAFE)}@{domain}>"


def build_message(
    mail: Email, mail_from: str, *, domain: str | None = None, date: datetime | None = None
) -> EmailMessage:
    """The RFC 5322 message for ``mail``.

    Raises ``ValueError`` for a message that can never be sent as it is (a line
    break in a header, a reserved header in ``headers``, an empty recipient).
    """
    if domain is None:
        domain = envelope_address(mail_from)[1]
    if not mail.to or not mail.to.strip():
        raise ValueError("empty recipient")
    msg = EmailMessage()
    _put_header(msg, "From", mail_from)
    _put_header(msg, "To", mail.to)
    _put_header(msg, "Subject", mail.subject)
    msg["Date"] = email.utils.format_datetime(date or datetime.now(UTC))
    msg["Message-ID"] = message_id_header(mail.message_id, domain)
    for name, value in mail.headers.items():
        if name.lower() in RESERVED_HEADERS:
            raise ValueError(f"header {name!r} is reserved")
        _put_header(msg, name, value)
    msg.set_content(mail.text)
    if mail.html is not None:
        msg.add_alternative(mail.html, subtype="html")
    _check_addresses(msg)
    return msg


# -- non-ASCII headers ------------------------------------------------------------
#
# The stdlib's header folder (email.policy.default) mishandles RFC 2047 encoded
# words: it can put the space between two words outside the encoded words, where
# a reader must drop it ("Привет мир" arrives as "Приветмир"; about 1 long
# non-ASCII subject in 10), or glue two encoded words together ("?==?"), which
# some providers bounce with 554 (CPython gh-144156). So non-ASCII unstructured
# values and display names are encoded here: whole-character base64 words of at
# most 75 characters, one per line, spaces inside the words, set pre-folded with
# ``set_raw`` (which the generator writes as it is, the lines being short).

_MAX_LINE = 78
_EW_OVERHEAD = len("=?utf-8?b??=")
_EW_MAX_BYTES = 45  # 12 + 60 base64 characters = 72 <= 75


def _put_header(msg: EmailMessage, name: str, value: str) -> None:
    msg[name] = value  # validates: no CR/LF; parses addresses
    if value.isascii():
        return
    header = msg[name]
    raw: str | None = None
    if isinstance(header, UnstructuredHeader):
        raw = _encoded_words(value, _MAX_LINE - len(name) - 2)
    elif isinstance(header, AddressHeader) and len(header.addresses) == 1:
        address = header.addresses[0]
        if address.display_name and address.addr_spec.isascii():
            words = _encoded_words(address.display_name, _MAX_LINE - len(name) - 2)
            last = words.rpartition("\n")[2]
            angle = f"<{address.addr_spec}>"
            sep = " " if len(last) + 1 + len(angle) <= _MAX_LINE else "\n "
            raw = f"{words}{sep}{angle}"
    if raw is not None:
        del msg[name]
        msg.set_raw(name, raw)


def _encoded_words(text: str, first_room: int) -> str:
    """``text`` as folded RFC 2047 words; the first line has ``first_room`` columns."""
    limit = min(_EW_MAX_BYTES, (first_room - _EW_OVERHEAD) // 4 * 3)
    lines: list[str] = [] if limit >= 6 else [""]  # no room: start on the next line
    if limit < 6:
        limit = _EW_MAX_BYTES
    chunk = bytearray()
    for char in text:
        encoded = char.encode("utf-8", "surrogatepass")
        if chunk and len(chunk) + len(encoded) > limit:
            lines.append(_word(chunk))
            chunk = bytearray()
            limit = _EW_MAX_BYTES
        chunk += encoded
    if chunk or not lines:
        lines.append(_word(chunk))
    return "\n ".join(lines)


def _word(data: bytes | bytearray) -> str:
    return f"=?utf-8?b?{base64.b64encode(bytes(data)).decode('ascii')}?="


def recipient_address(msg: EmailMessage) -> str:
    """The ``addr-spec`` of a built message's single ``To`` (the RCPT TO address)."""
    return str(msg["To"].addresses[0].addr_spec)


def _check_addresses(msg: EmailMessage) -> None:
    # The header registry parses leniently, recording defects instead of raising;
    # a To with no usable address, or several, is refused here, as permanent.
    to = msg["To"]
    addresses: tuple[Address, ...] = to.addresses
    if len(addresses) != 1 or not addresses[0].username or not addresses[0].domain:
        raise ValueError(f"To must be one address, got {str(to)!r}")
