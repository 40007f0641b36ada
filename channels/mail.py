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
    # Non-ASCII bodies as quoted-printable: 7-bit clean, so the message needs no
    # 8BITMIME from the server and the .eml is plain ASCII.
    msg.set_content(mail.text, cte=_cte(mail.text))
    if mail.html is not None:
        msg.add_alternative(mail.html, subtype="html", cte=_cte(mail.html))
    _check_addresses(msg)
    return msg


# -- headers ----------------------------------------------------------------------
#
# The stdlib's header folder (email.policy.default/SMTP) mishandles RFC 2047
# encoded words: it can put the space between two words outside the encoded
# words, where a reader must drop it ("Привет мир" arrives as "Приветмир"; about
# 1 long non-ASCII subject in 10), or glue two encoded words together ("?==?"),
# which some providers bounce with 554 (CPython gh-144156); and a value whose
# first word does not fit the first line gains a leading space. So unstructured
# values and display names are folded here and set with ``set_raw``, every line
# at most 78 characters (the generator writes such a value as it is): plain ASCII
# folded before a space, anything else (non-ASCII, control characters, "=?", a
# word too long to fold) as whole-character base64 words of at most 75 characters.

_MAX_LINE = 78
_EW_OVERHEAD = len("=?utf-8?b??=")
_EW_MAX_BYTES = 45  # 12 + 60 base64 characters = 72 <= 75
_PLAIN = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")


def _cte(body: str) -> str | None:
    return None if body.isascii() else "quoted-printable"


def _put_header(msg: EmailMessage, name: str, value: str) -> None:
    try:
        msg[name] = value  # validates: no CR/LF; parses addresses
    except (ValueError, TypeError):
        raise
    except Exception as exc:  # the stdlib parser can crash on odd input (AttributeError)
        raise ValueError(f"{name}: cannot parse {value!r}") from exc
    header = msg[name]
    room = _MAX_LINE - len(name) - 2  # "Name: " starts the first line
    raw: str | None
    if isinstance(header, UnstructuredHeader):
        raw = _fold_plain(value, room) if _PLAIN.fullmatch(value) and "=?" not in value else None
        if raw is None:
            raw = _encoded_words(value, room)
    elif isinstance(header, AddressHeader) and len(header.addresses) == 1:
        address = header.addresses[0]
        if not address.display_name or not address.addr_spec.isascii():
            return  # a bare address; or SMTPUTF8, left to the stdlib
        if value.isascii() and len(str(header)) <= room and "=?" not in value:
            return  # short and plain: the stdlib writes it on one line
        words = _encoded_words(address.display_name, room).split("\n")
        angle = f"<{address.addr_spec}>"
        last_room = room if len(words) == 1 else _MAX_LINE
        sep = " " if len(words[-1]) + 1 + len(angle) <= last_room else "\n "
        raw = "\n".join(words) + sep + angle
    else:
        return
    del msg[name]
    msg.set_raw(name, raw)


def _fold_plain(value: str, room: int) -> str | None:
    """Printable ASCII folded before spaces; None if a word does not fit a line."""
    lines: list[str] = []
    start, limit = 0, room
    while len(value) - start > limit:
        cut = value.rfind(" ", start + 1, start + limit + 1)
        if cut <= start:
            return None
        lines.append(value[start:cut])
        start, limit = cut, _MAX_LINE  # the next line starts with that space
    lines.append(value[start:])
    return "\n".join(lines)


def _encoded_words(text: str, first_room: int) -> str:
    """``text`` as folded RFC 2047 words; the first line has ``first_room`` columns.

    Words break after a space where there is one (a reader that wrongly keeps the
    folding whitespace between words, as CPython's address parser does, then
    shows a double space rather than a word cut in two).
    """
    limit = min(_EW_MAX_BYTES, (first_room - _EW_OVERHEAD) // 4 * 3)
    lines: list[str] = []
    if limit < 6:  # no room on the first line: start on the next one
        lines.append("")
        limit = _EW_MAX_BYTES
    chunk: list[str] = []
    size = 0
    for char in text:
        width = len(char.encode("utf-8", "surrogatepass"))
        if chunk and size + width > limit:
            cut = len(chunk)
            for i in range(len(chunk) - 1, len(chunk) // 2, -1):
                if chunk[i] == " ":
                    cut = i + 1
                    break
            lines.append(_word("".join(chunk[:cut])))
            chunk = chunk[cut:]
            size = len("".join(chunk).encode("utf-8", "surrogatepass"))
            limit = _EW_MAX_BYTES
            if size + width > limit:
                lines.append(_word("".join(chunk)))
                chunk, size = [], 0
        chunk.append(char)
        size += width
    if chunk or not lines or lines == [""]:
        lines.append(_word("".join(chunk)))
    return "\n ".join(lines)


def _word(text: str) -> str:
    data = text.encode("utf-8", "surrogatepass")
    return f"=?utf-8?b?{base64.b64encode(data).decode('ascii')}?="


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
