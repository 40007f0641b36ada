"""The push channel interface: mobile notifications through a pluggable provider.

Implementations live in :mod:`channels.pushers`: ``fcm`` (Firebase Cloud
Messaging HTTP v1, OAuth2 service-account credentials) and ``webhook`` (a JSON
POST signed with HMAC-SHA256, for an in-house gateway).
The composition root picks one from ``KVADRUPEL_PUSH_PROVIDER``
(``kvadrupel.factories.pusher_from_settings``); with none configured the channel is
off (no push is claimed).

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

__all__ = ["Push", "PushResult", "Pusher"]


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

