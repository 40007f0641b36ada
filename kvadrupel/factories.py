"""One place for wiring: every object built from :class:`~kvadrupel.settings.Settings`.

The layers below take plain values (a URL, a secret, a list of caps); only the
composition root knows the ``KVADRUPEL_*`` settings and turns them into objects.
Backends are imported when picked, so a process pulls in only the one it uses (no
SMTP client in the API, no web framework in a worker).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from base.errors import ConfigError
from channels.mail import Mailer
from channels.policy import ChannelPolicy, parse_quiet_hours
from channels.push import Pusher
from channels.unsubscribe import Unsubscriber
from kvadrupel.settings import Settings

if TYPE_CHECKING:
    from api.auth import Authenticator
    from engine.buses.kafka import KafkaBus

__all__ = [
    "authenticator_from_settings",
    "channel_policy_from_settings",
    "delivery_channel_parts",
    "kafka_bus_from_settings",
    "mailer_from_settings",
    "pusher_from_settings",
    "unsubscribe_secret_from_settings",
    "unsubscriber_from_settings",
]


# -- channels -------------------------------------------------------------------------
def mailer_from_settings(settings: Settings) -> Mailer:
    """The outbox folder when ``smtp_url`` is empty, else SMTP."""
    if not settings.smtp_url:
        from channels.mailers.outbox import OutboxMailer

        return OutboxMailer(settings.data_dir / "outbox", settings.mail_from,
                            fsync=settings.outbox_fsync)

    from channels.mailers.smtp import SmtpMailer

    return SmtpMailer(
        settings.smtp_url,
        settings.mail_from,
        username=settings.smtp_username or None,
        password=settings.smtp_password or None,
        timeout=settings.smtp_timeout_s,
        concurrency=settings.smtp_concurrency,
    )


def pusher_from_settings(settings: Settings) -> Pusher | None:
    """The configured push provider, or None (push off)."""
    provider = settings.push_provider.strip().lower()
    if not provider:
        return None
    if provider == "fcm":
        from channels.pushers.fcm import FcmPusher

        return FcmPusher(settings.push_fcm_credentials, endpoint=settings.push_fcm_url or None,
                         concurrency=settings.push_concurrency, timeout=settings.push_timeout_s)
    if provider == "webhook":
        from channels.pushers.webhook import WebhookPusher

        return WebhookPusher(settings.push_webhook_url, settings.push_webhook_secret,
                             concurrency=settings.push_concurrency, timeout=settings.push_timeout_s)
    raise ConfigError(f"KVADRUPEL_PUSH_PROVIDER must be fcm or webhook, got {provider!r}")


def channel_policy_from_settings(settings: Settings) -> ChannelPolicy:
    """Frequency caps and quiet hours (channels/policy.py)."""
    s = settings
    return ChannelPolicy(caps=dict(s.channel_caps), cap_window_s=s.channel_cap_window_s,
                         cap_policy=s.channel_cap_policy, quiet=parse_quiet_hours(s.quiet_hours),
                         quiet_channels=frozenset(s.quiet_hours_channels),
                         quiet_spread_s=s.quiet_hours_spread_s, default_tz=s.timezone)


def unsubscribe_secret_from_settings(settings: Settings) -> bytes:
    """``KVADRUPEL_UNSUBSCRIBE_SECRET``; if unset, derived from the admin token; if that
    is unset too (a bare embedded setup), a random key kept in ``data_dir/unsubscribe.key``
    (created once, atomically, by whichever process gets there first)."""
    if settings.unsubscribe_secret:
        return settings.unsubscribe_secret.encode()
    if settings.admin_token:
        return hmac.new(
            settings.admin_token.encode(), b"kvadrupel-unsubscribe", hashlib.sha256
        ).digest()
    path = Path(settings.data_dir) / "unsubscribe.key"
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, key.hex().encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic, and fails if another process got there first
    except FileExistsError:
        key = bytes.fromhex(path.read_text().strip())
    finally:
        tmp.unlink(missing_ok=True)
    return key


def unsubscriber_from_settings(settings: Settings) -> Unsubscriber:
    """Unsubscribe tokens and links (channels/unsubscribe.py)."""
    return Unsubscriber(unsubscribe_secret_from_settings(settings), settings.public_url,
                        settings.default_language)


def delivery_channel_parts(settings: Settings) -> dict[str, Any]:
    """``pusher``, ``policy``, ``unsubscriber`` and ``send_chunk`` keyword arguments of
    DeliveryWorker."""
    return {
        "pusher": pusher_from_settings(settings),
        "policy": channel_policy_from_settings(settings),
        "unsubscriber": unsubscriber_from_settings(settings),
        "send_chunk": settings.delivery_send_chunk,
    }


# -- bus ------------------------------------------------------------------------------
def kafka_bus_from_settings(settings: Settings) -> KafkaBus:
    """The Kafka bus (engine/buses/kafka.py); connects to nothing until used."""
    from engine.buses.kafka import KafkaBus

    return KafkaBus(
        settings.kafka_bootstrap,
        settings.kafka_topic_prefix,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
        fetch_wait_max_ms=settings.kafka_fetch_wait_max_ms,
        extra=settings.kafka_extra,
    )


# -- web ------------------------------------------------------------------------------
def authenticator_from_settings(settings: Settings,
                                clock: Callable[[], float] = time.time) -> Authenticator:
    """The banner API's bearer-token check (api/auth.py): service tokens and user JWTs."""
    from api.auth import Authenticator

    s = settings
    return Authenticator(service_tokens=[s.portal_token, s.admin_token],
                         jwt_algorithms=s.jwt_algorithms, jwt_secret=s.jwt_secret,
                         jwt_public_key=s.jwt_public_key, audience=s.jwt_audience,
                         issuer=s.jwt_issuer, leeway_s=s.jwt_leeway_s, clock=clock)
