"""The shard store interface: one shard database's per-user data.

Implementations (``shards.backends``): ``sqlite.SqliteShardStore`` (embedded) and
``postgres.PostgresShardStore`` (production). Both share the SQLAlchemy Core code in
``backends.sql`` and differ only where speed needs dialect SQL (bulk upserts,
streaming reads, range planning from statistics).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any, NamedTuple

from base.errors import StorageError
from shards.copytext import encode_rows

__all__ = [
    "ApplyFn",
    "BannerChange",
    "IngestDataError",
    "IngestItem",
    "IngestOutcome",
    "ProfileRow",
    "ProfileUpdate",
    "ScanRow",
    "ShardStore",
    "StateWrite",
]

Doc = dict[str, Any]


@dataclass(slots=True)
class ProfileUpdate:
    """What applying one user's events gave: what :data:`ApplyFn` returns (the ingest
    stage's ``engine.ingest.events.apply_user`` builds it; the store writes it)."""

    doc: Doc
    seen: list[str]  # the event ids now applied (capped)
    rejected: list[tuple[Any, str]]  # (event, reason)
    applied: int
    changed: bool  # the document differs from the one given (not just ``seen``)
    encoded: bytes  # ``orjson.dumps(doc)``, ready to store


# (doc or None, seen ids, events) -> a ProfileUpdate, or the short form (doc, seen ids,
# rejected [(event, reason)], applied count) for simple callers (tests, tools).
ApplyFn = Callable[
    [Doc | None, list[str], list[Any]],
    ProfileUpdate | tuple[Doc, list[str], list[tuple[Any, str]], int],
]
# What scan_range/scan_users yield per user: (user_id, profile doc, state or None).
ScanRow = tuple[int, Doc, dict[str, list[Any]] | None]


class IngestItem(NamedTuple):  # one per event on the hot path: a tuple is cheapest to make
    """An event for one user, with where it came from (``offset`` -1: not from Kafka)."""

    user_id: int
    event: Any
    topic: str = ""
    partition: int = -1
    offset: int = -1


class IngestDataError(StorageError):
    """The shard refused the data of an ingest batch (a constraint, a value it
    cannot store), not a connectivity problem: retrying the same batch cannot
    succeed. The ingest worker then bisects the batch down to the message and
    dead-letters it."""


@dataclass(slots=True)
class IngestOutcome:
    changed: list[int] = field(default_factory=list)  # users whose profile changed
    touched: list[int] = field(default_factory=list)  # users seen in the batch at all
    rejected: list[tuple[Any, str]] = field(default_factory=list)
    applied: int = 0
    skipped: int = 0  # at or below the shard's high-water mark: already applied


@dataclass(frozen=True, slots=True)
class ProfileRow:
    user_id: int
    doc: Doc
    # {rule_key: [episode, active, version, since]}; empty for a never-evaluated user
    state: dict[str, list[Any]]


class StateWrite(NamedTuple):
    """A user's evaluation state to store, with its place in the wake-up index.

    ``as_of``: the date the state was computed for; ``wake_on``: the earliest date
    on which an answer could change with the profile unchanged (the minimum of the
    rules' time horizons; None: never by time alone). A bare ``(user_id, matches)``
    pair stores neither: the user is due at the next run. ``matches`` None: the
    matches did not change — the stored ones stay (``{}`` for a user with none yet)
    and only the dates move."""

    user_id: int
    matches: dict[str, list[Any]] | None
    as_of: date | None = None
    wake_on: date | None = None


@dataclass(frozen=True, slots=True)
class BannerChange:
    """Show (``content`` given) or remove (``content`` None) a user's banner for a rule."""

    user_id: int
    rule_key: str
    episode: int
    version: int
    priority: int
    as_of: date
    content: dict[str, str] | None


class ShardStore(ABC):
    """One shard. Every write method is one transaction."""

    index: int

    # -- ingest ---------------------------------------------------------------
    @abstractmethod
    def ingest(self, items: Sequence[IngestItem], apply: ApplyFn,
               before_commit: Callable[[IngestOutcome], None] | None = None) -> IngestOutcome:
        """Apply events per user in order, in one transaction with the shard's
        high-water marks: items at or below the stored mark of their (topic,
        partition) are skipped, and the marks advance with the write.

        ``before_commit(outcome)`` runs inside the transaction, after the writes
        and before the commit (the ingest worker dead-letters the rejected events
        there: once the marks commit, a replay would skip them)."""

    # -- profiles -------------------------------------------------------------
    @abstractmethod
    def get_profile(self, user_id: int) -> Doc | None: ...

    @abstractmethod
    def put_profiles(self, docs: Sequence[tuple[int, Doc]]) -> None:
        """Bulk load (demo data, benchmarks): replace whole documents."""

    @abstractmethod
    def count(self) -> int: ...

    # The reads of an evaluation come in two forms. ``scan_*`` yield bare rows (no
    # object made per row: the nightly run reads every profile, and the evaluator
    # is what it is for); ``stream_*`` yield the same users as ProfileRow, for
    # everyone else. In both, each user in the selection comes exactly once,
    # chunks are never empty, and no order is promised: PostgreSQL streams a range
    # in storage order (an ORDER BY would cost the nightly run a sort or an index
    # walk), the portable backend happens to page in id order.
    @abstractmethod
    def scan_range(self, lo: int, hi: int, batch: int = 2000,
                   due_on: date | None = None) -> Iterator[Sequence[ScanRow]]:
        """The users with ``lo <= user_id <= hi``, in chunks of at most ``batch`` rows.

        A row unpacks as ``(user_id, doc, state)`` (a tuple, or a tuple-like
        database row): ``doc`` the profile document, ``state`` the evaluation
        state as :meth:`save_state` last stored it, or None for a user never
        evaluated. No order (see above).

        ``due_on``: only the users due for an evaluation as of that date — never
        evaluated, stored without an ``as_of``, computed for a later date (a
        replay), or with ``wake_on`` on or before it (:class:`StateWrite`)."""

    @abstractmethod
    def scan_users(self, user_ids: Sequence[int], batch: int = 2000) -> Iterator[Sequence[ScanRow]]:
        """The listed users that have a profile, as :meth:`scan_range` rows, in chunks
        of at most ``batch`` rows; unknown ids are left out, repeated ids come once."""

    def scan_range_text(self, lo: int, hi: int, batch: int = 2000,
                        due_on: date | None = None) -> Iterator[list[bytes]]:
        """:meth:`scan_range` as COPY text lines (shards/copytext.py), what the
        evaluator hands its sandbox child. PostgreSQL passes its COPY stream through
        unparsed; this default encodes the rows."""
        for rows in self.scan_range(lo, hi, batch, due_on):
            yield encode_rows(rows)

    def scan_users_text(self, user_ids: Sequence[int], batch: int = 2000) -> Iterator[list[bytes]]:
        """:meth:`scan_users` as COPY text lines."""
        for rows in self.scan_users(user_ids, batch):
            yield encode_rows(rows)

    @abstractmethod
    def stream_range(self, lo: int, hi: int, batch: int = 2000) -> Iterator[list[ProfileRow]]:
        """:meth:`scan_range` as ProfileRow (``state`` ``{}`` for a user never evaluated)."""

    @abstractmethod
    def stream_users(self, user_ids: Sequence[int]) -> Iterator[list[ProfileRow]]:
        """:meth:`scan_users` as ProfileRow."""

    @abstractmethod
    def stream_sample(self, fraction: float, batch: int = 2000) -> Iterator[list[ProfileRow]]:
        """A random sample of about ``fraction`` of the users (1.0: everyone)."""

    @abstractmethod
    def estimate_count(self) -> int:
        """A cheap estimate of the number of users (exact where that is cheap)."""

    @abstractmethod
    def plan_ranges(self, target_users: int) -> list[tuple[int, int]]:
        """Split this shard's key space into ``[lo, hi]`` ranges of about
        ``target_users`` users each, covering 1..2**63-1 with no gap or overlap."""

    # -- evaluation state -----------------------------------------------------
    @abstractmethod
    def save_state(self, states: Sequence[tuple[int, dict[str, list[Any]]] | StateWrite],
                   *, merge_wake: bool = False) -> None:
        """Store users' evaluation states (a :class:`StateWrite` or a bare
        ``(user_id, matches)`` pair). ``merge_wake``: a run restricted to some rules —
        its ``matches`` entries go over the stored ones (the other rules' stay), and
        the earlier of the stored and the new ``wake_on`` and the stored ``as_of`` are
        kept (it saw only its rules' horizons; a user with no stored state stays due
        for a full evaluation)."""

    @abstractmethod
    def count_due(self, due_on: date) -> int:
        """How many users :meth:`scan_range` with ``due_on`` would give over the
        whole shard (the run's "due" figure)."""

    # -- banners --------------------------------------------------------------
    @abstractmethod
    def apply_banner_changes(self, changes: Sequence[BannerChange]) -> list[int]:
        """Apply changes; return the users whose banner set changed."""

    @abstractmethod
    def banners(self, user_id: int) -> tuple[int, list[dict[str, Any]]]:
        """``(banner-set version, visible banners by priority)``."""

    @abstractmethod
    def banner_version(self, user_id: int) -> int: ...

    @abstractmethod
    def dismiss(self, user_id: int, banner_id: str) -> bool: ...

    @abstractmethod
    def set_ingest_cache(self, users: int) -> None:
        """Keep up to ``users`` profiles ingest read or wrote in memory (0: off);
        a no-op where the backend cannot keep such a cache safely."""

    @abstractmethod
    def add_banner_listener(self, fn: Callable[[list[tuple[int, int]]], None]) -> None:
        """Call ``fn([(user_id, version), ...])`` after every committed banner change
        made through this store object (in-process cache invalidation)."""

    @abstractmethod
    def remove_banner_listener(self, fn: Callable[[list[tuple[int, int]]], None]) -> None: ...

    @abstractmethod
    def close(self) -> None: ...
