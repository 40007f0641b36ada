"""Unsubscribe links: signed tokens, the link and headers added to every e-mail.

A token names a user, a channel and optionally a rule category, signed with
HMAC-SHA256 (128-bit tag) under the deployment's unsubscribe secret::

    <base64url("v1.<user id>.<channel>.<category or empty>")>.<base64url(tag)>

``/v1/unsubscribe/{token}`` needs no login: the token is the authority. ``GET``
(the footer link) only shows a page asking for confirmation — mail scanners and
link previews fetch links, and must not unsubscribe anyone; its button ``POST``s
to the same URL. A ``POST`` whose form body is ``List-Unsubscribe=One-Click``
(RFC 8058: what a mail client sends for the ``List-Unsubscribe-Post`` header, or
the page's button) opts the user out of that category on that channel (or of the
whole channel when the category is empty). So one URL serves the footer link, the
``List-Unsubscribe`` header and one-click. Tokens do not expire: an unsubscribe
link in an old e-mail must keep working.

The secret (chosen by ``kvadrupel.factories.unsubscribe_secret_from_settings``):
``KVADRUPEL_UNSUBSCRIBE_SECRET``; if unset, derived from the admin token; if that is
unset too (a bare embedded setup), a random key kept in ``data_dir/unsubscribe.key``.
Every process of a deployment must see the same one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import re
from dataclasses import dataclass

__all__ = ["UnsubscribeScope", "Unsubscriber"]

_TAG_BYTES = 16
_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)
LABELS = {
    "ru": ("Отписаться от этих писем", "Отписаться"),
    "en": ("Unsubscribe from these e-mails", "Unsubscribe"),
}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class UnsubscribeScope:
    user_id: int
    channel: str
    category: str | None  # None: the whole channel


class Unsubscriber:
    """Makes and checks tokens; builds the link, the headers and the footer."""

    def __init__(self, secret: bytes, public_url: str, default_language: str = "ru") -> None:
        if not secret:
            raise ValueError("empty unsubscribe secret")
        self._secret = secret
        self.base = public_url.rstrip("/")
        self.default_language = default_language

    def _tag(self, body: bytes) -> bytes:
        return hmac.new(self._secret, body, hashlib.sha256).digest()[:_TAG_BYTES]

    def token(self, user_id: int, channel: str, category: str | None) -> str:
        body = f"v1.{int(user_id)}.{channel}.{category or ''}".encode()
        return f"{_b64(body)}.{_b64(self._tag(body))}"

    def verify(self, token: str) -> UnsubscribeScope | None:
        """The scope of a valid token, else None (bad signature, malformed)."""
        try:
            body_b64, tag_b64 = token.split(".")
            body = _unb64(body_b64)
            tag = _unb64(tag_b64)
        except (ValueError, TypeError):
            return None
        if not hmac.compare_digest(tag, self._tag(body)):
            return None
        try:
            version, uid, channel, category = body.decode("ascii").split(".")
            user_id = int(uid)
        except (ValueError, UnicodeDecodeError):
            return None
        if version != "v1" or user_id <= 0 or not channel:
            return None
        return UnsubscribeScope(user_id, channel, category or None)

    def url(self, user_id: int, channel: str, category: str | None) -> str:
        return f"{self.base}/v1/unsubscribe/{self.token(user_id, channel, category)}"

    def headers(self, url: str) -> dict[str, str]:
        """RFC 2369 + RFC 8058: one-click is a POST of ``List-Unsubscribe=One-Click``
        to the same URL (a GET of it only shows the confirmation page). The URL must
        be https for mailbox providers to offer one-click (``KVADRUPEL_PUBLIC_URL``)."""
        return {
            "List-Unsubscribe": f"<{url}>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        }

    def labels(self, lang: str | None) -> tuple[str, str]:
        for tag in (lang or "", (lang or "").split("-")[0], self.default_language, "en"):
            if tag in LABELS:
                return LABELS[tag]
        return LABELS["en"]

    def add_footer(self, text: str, html_body: str | None, url: str,
                   lang: str | None) -> tuple[str, str | None]:
        """The text and HTML parts with the unsubscribe link at the end."""
        long_label, short_label = self.labels(lang)
        text = f"{text.rstrip()}\n\n--\n{long_label}: {url}\n"
        if html_body is not None:
            link = (f'<p style="font-size:12px;color:#777">'
                    f'<a href="{html.escape(url)}">{html.escape(short_label)}</a></p>')
            ends = list(_BODY_END.finditer(html_body))
            m = ends[-1] if ends else None
            html_body = (
                (html_body[: m.start()] + link + html_body[m.start() :]) if m else html_body + link
            )
        return text, html_body
