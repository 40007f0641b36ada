"""The push channel interface: mobile notifications through a pluggable provider.

Implementations live in :mod:`channels.pushers`: ``fcm`` (Firebase Cloud
Messaging HTTP v1, OAuth2 service-account credentials) and ``webhook`` (a JSON
POST signed with HMAC-SHA256, for an in-house gateway).
:func:`pusher_from_settings` picks one from ``KVADRUPEL_PUSH_PROVIDER``; with none
configured the channel is off (no push is claimed).

Semantics every implementation keeps (``tests/channels/test_push*.py`` checks both
against a real HTTP server on loopback):

* ``send_many`` returns one :class:`PushResult` per :class:`Push` (one device
  token each), in order, and never raises for a per-message failure:

  - ``ok=False, permanent=False``: transient (network, timeouts, 429, 5xx): retry;
  - ``ok=False, permanent=True``: do not retry this message;
  - ``unregistered=True`` (implies permanent): the token is no longer valid — the
    delivery worker removes it from the user's profile.

* ``Push.message_id`` is the idempotency key (``<user>.<rule>.<episode>``): it is
  the collapse key on the device, so a push sent again after a crash replaces the
  first instead of showing twice.
* A pusher belongs to one event loop; ``aclose`` releases its connections.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvadrupel.settings import Settings

__all__ = ["Push", "PushResult", "Pusher", "pusher_from_settings"]


@dataclass(frozen=True, slots=True)
class Push:
    token: str  # the device's registration token
    title: str
    body: str
    link: str = ""
    data: dict[str, str] = field(default_factory=dict)  # extra key/values for the app
    message_id: str = ""  # idempotency / collapse key


@dataclass(frozen=True, slots=True)
class PushResult:
    push: Push
    ok: bool
    permanent: bool = False
    unregistered: bool = False
    error: str | None = None


class Pusher(ABC):
    """Sends pushes; see the module docstring for the contract."""

    name = "push"

    @abstractmethod
    async def send_many(self, pushes: Sequence[Push]) -> list[PushResult]:
        """Send every push; one result per push, in order. Never raises per message."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release connections."""

    async def __aenter__(self) -> Pusher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def pusher_from_settings(settings: Settings) -> Pusher | None:
    """The configured provider, or None (push off)."""
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
    from base.errors import ConfigError

    raise ConfigError(f"KVADRUPEL_PUSH_PROVIDER must be fcm or webhook, got {provider!r}")
