"""What the web layer is given: :class:`Services` (and the settings it reads).

The API never builds a backend and never imports the composition root
(``kvadrupel``): the process that serves it (``kvadrupel api``, the demo, a test)
builds one ``kvadrupel.container.Container`` and passes it to
:func:`api.app.create_app`. The container satisfies these protocols structurally;
they list exactly what ``api/`` uses of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from api.auth import Authenticator
    from base.clock import Clock
    from catalogue.service import RuleService
    from channels.ledger import Ledger
    from channels.unsubscribe import Unsubscriber
    from engine.bus import Bus
    from engine.runs import RunService
    from shards.shardset import ShardSet

__all__ = ["ApiSettings", "Services"]


class ApiSettings(Protocol):
    """The ``KVADRUPEL_*`` settings the web layer reads (``kvadrupel.settings.Settings``
    has them all; the admin settings page shows a few more by name, if present)."""

    timezone: str
    public_url: str
    # service tokens of the REST API
    admin_token: str
    ingest_token: str
    portal_token: str
    # REST and banner API
    api_max_inflight: int
    profile_max_bytes: int
    range_target_users: int
    engagement_flush_s: float
    banner_max_age_s: int
    banner_link_schemes: list[str]
    banner_cache_users: int
    banner_cache_bodies: int
    banner_longpoll_max_waiters: int
    banner_longpoll_max_wait_s: int
    replica_retry_s: float
    replica_max_lag_bytes: int
    # admin UI
    admin_session_secret: str
    admin_session_max_age_s: int
    admin_cookie_secure: bool
    admin_trusted_proxies: list[str]
    admin_approval_audience: int
    admin_preview_sample: int


class Services(Protocol):
    """The backends and services one API process works with, built by the caller."""

    @property
    def settings(self) -> ApiSettings: ...

    @property
    def version(self) -> str:
        """The product's version (the OpenAPI document's)."""
        ...

    @property
    def clock(self) -> Clock:
        """Every "now" and "today" of the API."""
        ...

    @property
    def control(self) -> Engine:
        """The control database."""
        ...

    @property
    def shards(self) -> ShardSet: ...

    @property
    def rules(self) -> RuleService: ...

    @property
    def runs(self) -> RunService: ...

    @property
    def bus(self) -> Bus: ...

    @property
    def ledger(self) -> Ledger: ...

    def authenticator(self) -> Authenticator:
        """A new bearer-token check for the banner and engagement endpoints."""
        ...

    def unsubscriber(self) -> Unsubscriber:
        """A new maker and checker of unsubscribe tokens."""
        ...

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """(every dependency reachable, {check: "ok" | reason}); blocks."""
        ...

    def add_closer(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` when the services are closed (before their own parts)."""
        ...

    def close(self) -> None: ...
