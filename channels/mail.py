"""The e-mail channel interface.

Two implementations live in :mod:`channels.mailers`: ``outbox`` (the embedded
default: one ``.eml`` file per message under ``data_dir/outbox``) and ``smtp``
(aiosmtplib over a small pool of persistent connections).
The composition root picks one (``kvadrupel.factories.mailer_from_settings``): the
outbox when ``smtp_url`` is empty.

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
  text/html); without, it is a single text/plain part. Both mailers send the
  bytes of :func:`render_message` (:func:`build_message` is its EmailMessage).
* A mailer belongs to one event loop; ``aclose`` releases its connections.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import errors, policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser
from functools import lru_cache
from urllib.parse import quote

__all__ = [
    "Email",
    "Mailer",
    "RESERVED_HEADERS",
    "SendResult",
    "build_message",
    "envelope_address",
    "message_id_header",
    "parse_message",
    "render_message",
    "RenderedMessage",
]


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


# -- message building, shared by the implementations ---------------------------
#
# Messages are written straight to their wire form (CRLF, 7-bit unless an
# address needs SMTPUTF8) instead of through email.message.EmailMessage and its
# generator, for two reasons:
#
# * the stdlib's header folder mishandles RFC 2047 encoded words: it can put the
#   space between two words outside the encoded words, where a reader must drop
#   it ("заказ номер 100 доставлен" arrives as "номер 100доставлен"; about one
#   long non-ASCII subject in ten), or glue two encoded words together ("?==?"),
#   which some providers bounce with 554 (CPython gh-144156); and a value whose
#   first word does not fit the first line gains a leading space;
# * it is slow: building and flattening a text+html message took ~1.4 ms of CPU,
#   most of an SMTP send; this takes a small fraction of that.
#
# Headers are folded here, every line at most 78 characters: plain ASCII before a
# space; anything else (non-ASCII, control characters, "=?", a word too long to
# fold) as whole-character base64 encoded words of at most 75 characters. Bodies
# are 7bit when they are short-lined ASCII, quoted-printable otherwise.
# :func:`build_message` parses the result back into an EmailMessage.


@dataclass(frozen=True, slots=True)
class RenderedMessage:
    data: bytes  # the message, CRLF line ends, as sent after DATA / stored as .eml
    recipient: str  # the RCPT TO address (addr-spec of To)
    message_id: str  # the Message-ID header, "<...>"
    smtputf8: bool  # an address is not ASCII: needs the SMTPUTF8 extension


# Headers an ``Email.headers`` entry may not set: they are built from the other
# fields (or from the mailer's configuration, for From) and the MIME structure.
RESERVED_HEADERS = frozenset(
    name.lower()
    for name in (
        "From", "Sender", "To", "Cc", "Bcc", "Subject", "Date", "Message-ID",
        "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
        "Content-Disposition", "Content-ID", "Return-Path", "Received",
        "Resent-From", "Resent-Sender", "Resent-To", "Resent-Cc", "Resent-Bcc",
        "Resent-Date", "Resent-Message-ID",
    )
)
# Extra headers that hold one address (with an optional display name).
_ADDRESS_HEADERS = frozenset({"reply-to"})
# Extra headers holding a list of <URI>s (RFC 2369): never encoded words, folded
# only between entries; a single entry may be up to the 998-character line limit.
_URI_LIST_HEADERS = frozenset({"list-unsubscribe", "list-help", "list-subscribe", "list-post",
                               "list-owner", "list-archive"})
_URI_ENTRY = re.compile(r"<[\x21-\x3b\x3d\x3f-\x7e]+>")

_MAX_LINE = 78
_MAX_ID = 900  # Message-ID length limit (the line limit is 998)
_EW_OVERHEAD = len("=?utf-8?b??=")
_EW_MAX_BYTES = 45  # 12 + 60 base64 characters = 72 <= 75
_PLAIN = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]{1,76}")
_BARE_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)
_MSGID_RE = re.compile(r"<[\x21-\x3b\x3d\x3f\x41-\x7e]+@[\x21-\x3b\x3d\x3f\x41-\x7e]+>")
# RFC 5322 atext plus "."; everything else in a key is %-escaped, so distinct keys
# keep distinct Message-IDs.
_ATEXT_SAFE = "!#$&'*+-/=?^_`{|}~."
_NOT_7BIT = re.compile(r"[^\t\n\x20-\x7e]")
_MAX_BODY_LINE = 998


def envelope_address(mail_from: str) -> tuple[str, str]:
    """(``addr-spec``, domain) of a ``From`` value such as ``"Name <a@b.c>"``."""
    try:
        _, addr, _ = _address_field_cached(mail_from)
    except ValueError as exc:
        raise ValueError(f"mail_from {mail_from!r}: {exc}") from None
    return addr, addr.rpartition("@")[2]


def message_id_header(key: str | None, domain: str) -> str:
    """The ``Message-ID`` for an idempotency key; a fresh one when ``key`` is None.

    A key that already is a message id (``<left@right>``) is used as it is; any
    other key becomes ``<escaped-key@domain>``, the same for the same key.
    """
    if key is None:
        return email.utils.make_msgid(domain=domain)
    key = key.strip()
    if not key:
        raise ValueError("message_id is empty")
    if _MSGID_RE.fullmatch(key):
        msgid = key
    else:
        msgid = f"<{quote(key, safe=_ATEXT_SAFE)}@{domain}>"
    if len(msgid) > _MAX_ID:
        raise ValueError(f"message_id longer than {_MAX_ID} characters")
    return msgid


def render_message(
    mail: Email, mail_from: str, *, domain: str | None = None, date: datetime | None = None
) -> RenderedMessage:
    """The wire form of ``mail``: RFC 5322 + MIME, CRLF line ends.

    Raises ``ValueError`` for a message that can never be sent as it is (a line
    break in a header other than Subject, where line breaks become a space; a
    reserved or malformed header name; a To that is not exactly one address).
    """
    from_value, _, from_utf8 = _address_field_cached(mail_from)
    to_value, recipient, to_utf8 = _address_field("To", mail.to)
    if domain is None:
        domain = envelope_address(mail_from)[1]
    msgid = message_id_header(mail.message_id, domain)
    lines = [
        f"From: {from_value}",
        f"To: {to_value}",
        f"Subject: {_unstructured('Subject', _one_line(mail.subject))}",
        f"Date: {_date_header(date)}",
        f"Message-ID: {msgid}",
    ]
    utf8 = from_utf8 or to_utf8
    for name, value in mail.headers.items():
        if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
            raise ValueError(f"bad header name {name!r}")
        if name.lower() in RESERVED_HEADERS:
            raise ValueError(f"header {name!r} is reserved")
        if not isinstance(value, str):
            raise ValueError(f"header {name!r}: value must be a string")
        if name.lower() in _ADDRESS_HEADERS:
            folded, _, is_utf8 = _address_field(name, value)
            utf8 = utf8 or is_utf8
        elif name.lower() in _URI_LIST_HEADERS:
            folded = _uri_list(name, value)
        else:
            folded = _unstructured(name, value)
        lines.append(f"{name}: {folded}")
    lines.append("MIME-Version: 1.0")

    text_cte, text_body = _body(mail.text)
    if mail.html is None:
        lines.append('Content-Type: text/plain; charset="utf-8"')
        lines.append(f"Content-Transfer-Encoding: {text_cte}")
        body = text_body
    else:
        html_cte, html_body = _body(mail.html)
        b = _boundary(text_body, html_body)
        lines.append(f'Content-Type: multipart/alternative;\n boundary="{b}"')
        # The line break before a boundary belongs to the boundary (RFC 2046 5.1.1).
        body = (
            f'--{b}\nContent-Type: text/plain; charset="utf-8"\n'
            f"Content-Transfer-Encoding: {text_cte}\n\n{text_body}\n"
            f'--{b}\nContent-Type: text/html; charset="utf-8"\n'
            f"Content-Transfer-Encoding: {html_cte}\n\n{html_body}\n"
            f"--{b}--\n"
        )
    lines += ["", body]
    text = "\n".join(lines).replace("\n", "\r\n")  # the body's line ends are LF only
    data = text.encode("utf-8") if utf8 else text.encode("ascii")
    return RenderedMessage(data=data, recipient=recipient, message_id=msgid, smtputf8=utf8)


_last_date: tuple[int, str] = (0, "")


def _date_header(date: datetime | None) -> str:
    """The Date header value; for now, formatted once per second (its precision)."""
    global _last_date
    if date is not None:
        return email.utils.format_datetime(date)
    now = datetime.now(UTC)
    second = int(now.timestamp())
    cached = _last_date
    if cached[0] != second:
        cached = _last_date = (second, email.utils.format_datetime(now.replace(microsecond=0)))
    return cached[1]


def build_message(
    mail: Email, mail_from: str, *, domain: str | None = None, date: datetime | None = None
) -> EmailMessage:
    """``render_message`` parsed back into an EmailMessage (LF line ends)."""
    data = render_message(mail, mail_from, domain=domain, date=date).data
    return parse_message(data)


def parse_message(data: bytes) -> EmailMessage:
    """Parse a wire-form message; CRLF become LF, so ``get_content()`` has no "\\r"."""
    msg = _PARSER.parsebytes(data.replace(b"\r\n", b"\n"))
    assert isinstance(msg, EmailMessage)
    return msg


_PARSER = BytesParser(policy=policy.default)


# -- headers ----------------------------------------------------------------------

_LINE_BREAKS = re.compile(r"\s*[\r\n]+\s*")


def _one_line(subject: str) -> str:
    # A subject is rendered from a template and a profile: a line break in a
    # profile value should not make the message unsendable. Anything else that
    # is a header keeps its line breaks, and is refused.
    return _LINE_BREAKS.sub(" ", subject) if isinstance(subject, str) else subject


def _check_value(name: str, value: str) -> None:
    if "\r" in value or "\n" in value:
        raise ValueError(f"header {name!r} contains a line break")


@lru_cache(maxsize=64)
def _address_field_cached(value: str) -> tuple[str, str, bool]:
    return _address_field("From", value)


def _address_field(name: str, value: str) -> tuple[str, str, bool]:
    """(folded header value, addr-spec, needs SMTPUTF8) for exactly one address."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    _check_value(name, value)
    value = value.strip()
    if not value:
        raise ValueError(f"{name} is empty")
    if len(value) <= 254 and _BARE_ADDRESS.fullmatch(value):
        return value, value, False  # the common case, without the slow parser
    try:
        header = _REGISTRY("To", value)
        addresses, defects = header.addresses, header.defects
    except Exception as exc:  # the stdlib parser can even crash on odd input
        raise ValueError(f"{name}: cannot parse {value!r}") from exc
    # It parses leniently; a defect means it guessed. A non-ASCII local part is
    # fine: that is what SMTPUTF8 is for.
    defects = [d for d in defects if not isinstance(d, errors.NonASCIILocalPartDefect)]
    if defects:
        raise ValueError(f"{name}: malformed address {value!r}: {defects[0]}")
    if len(addresses) != 1 or not addresses[0].username or not addresses[0].domain:
        raise ValueError(f"{name} must be one address, got {value!r}")
    address = addresses[0]
    addr_spec = address.addr_spec
    utf8 = not addr_spec.isascii()
    if any(ch in addr_spec for ch in "\r\n\x00") or len(addr_spec) > 254:
        raise ValueError(f"{name}: bad address {addr_spec!r}")
    angle = f"<{addr_spec}>"
    display = address.display_name
    if not display:
        return addr_spec, addr_spec, utf8
    room = _MAX_LINE - len(name) - 2  # "Name: " starts the first line
    plain = str(Address(display_name=display, addr_spec="x@x")).removesuffix(" <x@x>")
    if plain.isascii() and _PLAIN.fullmatch(plain) and "=?" not in plain:
        if len(plain) + 1 + len(angle) <= room:
            return f"{plain} {angle}", addr_spec, utf8
    words = _encoded_words(display, room).split("\n")
    last_room = room if len(words) == 1 else _MAX_LINE
    sep = " " if len(words[-1]) + 1 + len(angle) <= last_room else "\n "
    return "\n".join(words) + sep + angle, addr_spec, utf8


_REGISTRY = policy.default.header_factory


def _uri_list(name: str, value: str) -> str:
    """``<uri>, <uri>`` (RFC 2369) folded between entries; each entry one line."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    _check_value(name, value)
    entries = [e.strip() for e in value.split(",")]
    if not entries or not all(_URI_ENTRY.fullmatch(e) for e in entries):
        raise ValueError(f"header {name!r} must be a list of <URI>s")
    lines = [entries[0]]
    width = len(name) + 2 + len(entries[0])
    for e in entries[1:]:
        if width + 2 + len(e) <= _MAX_LINE:
            lines[-1] += ", " + e
            width += 2 + len(e)
        else:
            lines[-1] += ","
            lines.append(" " + e)
            width = 1 + len(e)
    if max(len(x) for x in lines) + len(name) + 2 > 998:
        raise ValueError(f"header {name!r}: an entry is longer than the 998-character line limit")
    return "\n".join(lines)


def _unstructured(name: str, value: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    _check_value(name, value)
    room = _MAX_LINE - len(name) - 2
    if not value:
        return ""
    if _PLAIN.fullmatch(value) and "=?" not in value:
        folded = _fold_plain(value, room)
        if folded is not None:
            return folded
    return _encoded_words(value, room)


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


# -- bodies -------------------------------------------------------------------------

def _body(content: str) -> tuple[str, str]:
    """(Content-Transfer-Encoding, encoded body with LF line ends, ending in LF)."""
    if not isinstance(content, str):
        raise ValueError("body must be a string")
    text = content.replace("\r\n", "\n").replace("\r", "\n")
    if not text.endswith("\n"):
        text += "\n"  # as EmailMessage.set_content does
    if not _NOT_7BIT.search(text) and (
        len(text) <= _MAX_BODY_LINE or max(map(len, text.split("\n"))) <= _MAX_BODY_LINE
    ):
        return "7bit", text
    encoded = binascii.b2a_qp(text.encode("utf-8", "surrogatepass"), istext=True)
    return "quoted-printable", encoded.decode("ascii")


def _boundary(*bodies: str) -> str:
    while True:
        boundary = f"=_kvadrupel_{secrets.token_hex(12)}"
        if not any(boundary in body for body in bodies):
            return boundary
