"""Shared helpers for the channel tests."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path

from channels.mail import Email, Mailer, SendResult

HERE = Path(__file__).parent
# A self-signed certificate for 127.0.0.1 / localhost (EC P-256, valid until 2126),
# for the loopback TLS tests only.
CERT = HERE / "tls-cert.pem"
KEY = HERE / "tls-key.pem"

MAIL_FROM = "Kvadrupel <noreply@kvadrupel.test>"


def send(make: Callable[[], Mailer], emails: Sequence[Email]) -> list[SendResult]:
    """Open a mailer, send one batch, close it: one event loop per call."""

    async def go() -> list[SendResult]:
        async with make() as mailer:
            return await mailer.send_many(emails)

    return asyncio.run(go())


def emails(n: int, *, prefix: str = "m", html: bool = True) -> list[Email]:
    return [
        Email(
            to=f"user{i}@example.com",
            subject=f"Subject {i}",
            text=f"Hello user {i}",
            html=f"<p>Hello <b>user {i}</b></p>" if html else None,
            message_id=f"{prefix}-{i}",
        )
        for i in range(n)
    ]


def server_tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(CERT, KEY)
    return ctx


def client_tls_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(CERT))
