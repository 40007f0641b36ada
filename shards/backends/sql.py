"""The SQLAlchemy Core code shared by the SQLite and PostgreSQL shard stores."""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import date
from typing import Any, NamedTuple

import orjson
from sqlalchemy import (
    Engine,
    and_,
    bindparam,
    case,
    func,
    or_,
    select,
    tablesample,
    text,
    true,
    update,
)
from sqlalchemy.exc import DataError, IntegrityError, OperationalError

from base.clock import SYSTEM
from shards.backends.banners import SqlBanners
from shards.router import MAX_USER_ID
from shards.schema import ingest_marks, profiles, user_state
from shards.store import (
    ApplyFn,
    IngestDataError,
    IngestItem,
    IngestOutcome,
    ProfileRow,
    ProfileUpdate,
    ScanRow,
    ShardStore,
    StateWrite,
)

_log = logging.getLogger("kvadrupel.shards")



def json_dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


class ProfileWrite(NamedTuple):
    """One profile to store after ingest: ``version`` is the one read (0: new user)."""

    user_id: int
    doc: dict[str, Any]
    encoded: bytes  # orjson of doc
    seen: list[str]
    version: int


# A profile as ingest last committed it: (doc JSON, seen ids, version); the seen ids
# are a tuple where pg_ingest caches them, a list elsewhere.
CachedProfile = tuple[Any, Sequence[str], int]


class ProfileCache:
    """LRU of ``user_id -> (doc JSON, seen ids, version)`` as last committed by ingest."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._d: OrderedDict[int, CachedProfile] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._d)

    def lookup(
        self, user_ids: Iterable[int]
    ) -> tuple[dict[int, CachedProfile], list[int]]:
        found: dict[int, CachedProfile] = {}
        missing: list[int] = []
        d = self._d
        for uid in user_ids:
            entry = d.get(uid)
            if entry is None:
                missing.append(uid)
            else:
                found[uid] = entry
        self.hits += len(found)
        self.misses += len(missing)
        return found, missing

    def update(self, entries: dict[int, CachedProfile]) -> None:
        d = self._d
        for uid, entry in entries.items():
            d[uid] = entry
            d.move_to_end(uid)
        while len(d) > self.capacity:
            d.popitem(last=False)

    def discard(self, user_ids: Iterable[int]) -> None:
        for uid in user_ids:
            self._d.pop(uid, None)


def _as_update(result: Any) -> ProfileUpdate:
    """An ApplyFn result as an object with ``changed`` and ``encoded``."""
    if isinstance(result, tuple):  # the short form: (doc, seen, rejected, applied)
        doc, seen, rejected, applied = result
        return ProfileUpdate(doc, seen, rejected, applied, applied > 0, orjson.dumps(doc))
    update: ProfileUpdate = result
    return update


def _split_by_marks(
    items: Sequence[IngestItem], marks: dict[tuple[str, int], int], out: IngestOutcome
) -> tuple[dict[int, list[Any]], dict[tuple[str, int], int]]:
    """Events per user (arrival order) not yet applied, and the marks to store.

    An item at or below its partition's mark was applied by an earlier
    transaction (or belonged to another shard, or was invalid): skip it.
    """
    per_user: dict[int, list[Any]] = {}
    new_marks: dict[tuple[str, int], int] = {}
    touched: dict[int, None] = {}
    for it in items:
        touched[it.user_id] = None
        if it.offset >= 0:
            key = (it.topic, it.partition)
            if it.offset <= marks.get(key, -1):
                out.skipped += 1
                continue
            if it.offset > new_marks.get(key, -1):
                new_marks[key] = it.offset
        per_user.setdefault(it.user_id, []).append(it.event)
    out.touched = list(touched)
    return per_user, new_marks


class SqlShardStore(SqlBanners, ShardStore):
    """Portable implementation; subclasses override the hot paths. The banner
    tables' code is its own module (shards/backends/banners.py)."""

    def __init__(self, index: int, engine: Engine, read_engine: Engine | None = None) -> None:
        SqlBanners.__init__(self, index, engine, read_engine)

    # -- ingest -----------------------------------------------------------------
    # Errors meaning "this shard cannot do it now": the batch is retried later.
    _transient_errors: tuple[type[Exception], ...] = (OperationalError,)
    # Errors meaning "this shard refuses this data": retrying cannot help.
    _data_errors: tuple[type[Exception], ...] = (DataError, IntegrityError)

    @property
    def _checks_versions(self) -> bool:
        """True where _write_profiles refuses to overwrite a version other than the one
        read (PostgreSQL): only then may profiles be served from the ingest cache."""
        return False
    _ingest_cache: ProfileCache | None = None

    def set_ingest_cache(self, users: int) -> None:
        """Keep up to ``users`` profiles that ingest read or wrote in memory, so the
        next batch for them skips the read. Safe because every write is conditional
        on the version it started from: a profile changed by anyone else fails the
        write, leaves the cache and the batch is retried. No-op where writes do
        not check versions."""
        self._ingest_cache = ProfileCache(users) if users > 0 and self._checks_versions else None

    def ingest(self, items: Sequence[IngestItem], apply: ApplyFn,
               before_commit: Callable[[IngestOutcome], None] | None = None) -> IngestOutcome:
        out = IngestOutcome()
        if not items:
            return out
        cache = self._ingest_cache
        fresh: dict[int, CachedProfile] = {}  # cached once committed
        per_user: dict[int, list[Any]] = {}
        try:
            with self.engine.begin() as conn:
                keys = {(it.topic, it.partition) for it in items if it.offset >= 0}
                marks = self._lock_marks(conn, keys) if keys else {}
                per_user, new_marks = _split_by_marks(items, marks, out)
                if per_user:
                    self._apply_users(conn, per_user, apply, out, fresh)
                if new_marks:
                    self._save_marks(conn, new_marks)
                if before_commit is not None:
                    before_commit(out)
        except BaseException as exc:
            if cache is not None:  # the outcome may be unknown (commit lost): forget them
                cache.discard(per_user)
            if isinstance(exc, self._transient_errors):
                raise self._unavailable(exc) from exc
            if isinstance(exc, self._data_errors):
                raise IngestDataError(f"shard {self.index}: {str(exc).splitlines()[0]}") from exc
            raise
        if cache is not None:
            cache.update(fresh)
        return out

    def _lock_marks(self, conn: Any, keys: set[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """The shard's marks for ``keys``, locked until the transaction ends.

        The rows are created first (at -1) so that there is always a row to lock:
        two workers replaying the same partition after a rebalance then queue on
        it instead of both applying the same offsets. (SQLite: ``BEGIN IMMEDIATE``
        already serialises writers.)
        """
        ins = self._insert(ingest_marks)
        conn.execute(ins.on_conflict_do_nothing(index_elements=["topic", "partition"]),
                     [{"topic": t, "partition": p, "offset": -1} for t, p in keys])
        stmt = self._for_update(
            select(ingest_marks).where(ingest_marks.c.topic.in_({t for t, _ in keys}))
        )
        return {(r.topic, r.partition): r.offset for r in conn.execute(stmt)}

    def _save_marks(self, conn: Any, marks: dict[tuple[str, int], int]) -> None:
        conn.execute(
            update(ingest_marks)
            .where(
                (ingest_marks.c.topic == bindparam("t"))
                & (ingest_marks.c.partition == bindparam("p"))
            )
            .values(offset=bindparam("o")),
            [{"t": t, "p": p, "o": o} for (t, p), o in marks.items()],
        )

    def _load_for_update(self, conn: Any, user_ids: list[int]) -> dict[int, tuple[Any, Any, int]]:
        """``{user_id: (doc, seen, version)}`` of the users that have a profile."""
        stmt = self._for_update(
            select(profiles.c.user_id, profiles.c.doc, profiles.c.seen, profiles.c.version).where(
                profiles.c.user_id.in_(user_ids)
            )
        )
        return {r.user_id: (r.doc, r.seen, r.version) for r in conn.execute(stmt)}

    def _current(self, conn: Any, per_user: dict[int, Any]) -> dict[int, Any]:
        """The stored (doc, seen, version) of these users: from the ingest cache where it
        has them, else read (and locked) from the table."""
        cache = self._ingest_cache
        if cache is None:
            return self._load_for_update(conn, list(per_user))
        current, missing = cache.lookup(per_user)
        if missing:
            current.update(self._load_for_update(conn, missing))
        return current

    def _apply_users(
        self, conn: Any, per_user: dict[int, list[Any]], apply: ApplyFn, out: IngestOutcome,
        fresh: dict[int, CachedProfile],
    ) -> None:
        """Apply each user's events to their stored profile and write the changed
        ones; ``fresh`` receives every profile's state after the write (for the
        cache)."""
        current = self._current(conn, per_user)
        rows: list[ProfileWrite] = []
        for uid, events in per_user.items():
            state = current.get(uid)
            doc, seen, version = state if state is not None else (None, None, 0)
            upd = _as_update(apply(doc, seen or [], events))
            if upd.rejected:
                out.rejected += upd.rejected
            if upd.applied:
                out.applied += upd.applied
                if upd.changed:
                    out.changed.append(uid)
                rows.append(ProfileWrite(uid, upd.doc, upd.encoded, upd.seen, version))
                fresh[uid] = (upd.encoded, upd.seen, version + 1)
            elif state is not None:
                fresh[uid] = state
        if rows:
            self._write_profiles(conn, rows)

    def _write_profiles(self, conn: Any, rows: list[ProfileWrite]) -> None:
        """Store the new documents (``version`` is the one loaded, 0: none)."""
        ts = SYSTEM.now()
        ins = self._insert(profiles)
        conn.execute(
            ins.on_conflict_do_update(
                index_elements=["user_id"],
                set_={"doc": ins.excluded.doc, "seen": ins.excluded.seen,
                      "version": ins.excluded.version, "updated_at": ins.excluded.updated_at},
            ),
            [{"user_id": r.user_id, "doc": r.doc, "seen": r.seen, "version": r.version + 1,
              "updated_at": ts} for r in rows],
        )

    def _upsert_profiles(self, conn: Any, rows: list[tuple[int, Any, list[str]]]) -> None:
        ts = SYSTEM.now()
        ins = self._insert(profiles)
        conn.execute(
            ins.on_conflict_do_update(
                index_elements=["user_id"],
                set_={
                    "doc": ins.excluded.doc,
                    "seen": ins.excluded.seen,
                    "version": profiles.c.version + 1,
                    "updated_at": ins.excluded.updated_at,
                },
            ),
            [
                {"user_id": u, "doc": d, "seen": s, "version": 1, "updated_at": ts}
                for u, d, s in rows
            ],
        )

    # -- profiles ---------------------------------------------------------------
    def get_profile(self, user_id: int) -> dict[str, Any] | None:
        try:
            with self.read_engine.connect() as conn:
                return conn.execute(
                    select(profiles.c.doc).where(profiles.c.user_id == user_id)
                ).scalar()
        except OperationalError as exc:
            raise self._unavailable(exc) from exc

    def put_profiles(self, docs: Sequence[tuple[int, dict[str, Any]]]) -> None:
        with self.engine.begin() as conn:
            self._upsert_profiles(conn, [(u, d, []) for u, d in docs])

    def count(self) -> int:
        with self.read_engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(profiles)).scalar() or 0)

    def _rows_query(self) -> Any:
        return select(profiles.c.user_id, profiles.c.doc, user_state.c.matches).select_from(
            profiles.outerjoin(user_state, profiles.c.user_id == user_state.c.user_id)
        )

    # The evaluator's reads (the contract: ShardStore.scan_range). ``scan_*`` yield
    # database rows, which unpack as ``(user_id, doc, state or None)``; ``stream_*``
    # wrap them in ProfileRow.
    def scan_range(self, lo: int, hi: int, batch: int = 2000,
                   due_on: date | None = None) -> Iterator[Sequence[ScanRow]]:
        """Keyset pages in id order, one short query each (SQLite keeps no long
        read open)."""
        last = lo - 1
        due = true() if due_on is None else _due(due_on)
        try:
            while True:
                with self.read_engine.connect() as conn:
                    rows = conn.execute(
                        self._rows_query()
                        .where(and_(profiles.c.user_id > last, profiles.c.user_id <= hi, due))
                        .order_by(profiles.c.user_id)
                        .limit(batch)
                    ).all()
                if not rows:
                    return
                yield rows
                if len(rows) < batch:
                    return
                last = rows[-1][0]
        except OperationalError as exc:
            raise self._unavailable(exc) from exc

    def scan_users(self, user_ids: Sequence[int], batch: int = 2000) -> Iterator[Sequence[ScanRow]]:
        ids = sorted(set(user_ids))
        step = max(1, min(batch, 1000))  # ids per query: an IN list of bound parameters
        try:
            for i in range(0, len(ids), step):
                chunk = ids[i : i + step]
                with self.read_engine.connect() as conn:
                    rows = conn.execute(
                        self._rows_query().where(profiles.c.user_id.in_(chunk)).order_by(profiles.c.user_id)
                    ).all()
                if rows:
                    yield rows
        except OperationalError as exc:
            raise self._unavailable(exc) from exc

    def stream_range(self, lo: int, hi: int, batch: int = 2000) -> Iterator[list[ProfileRow]]:
        for rows in self.scan_range(lo, hi, batch):
            yield [ProfileRow(u, d, s or {}) for u, d, s in rows]

    def stream_users(self, user_ids: Sequence[int]) -> Iterator[list[ProfileRow]]:
        for rows in self.scan_users(user_ids):
            yield [ProfileRow(u, d, s or {}) for u, d, s in rows]

    def plan_ranges(self, target_users: int) -> list[tuple[int, int]]:
        """Portable: count, then one OFFSET probe per boundary (fine for embedded
        shards; PostgreSQL overrides this with its statistics)."""
        n = self.count()
        k = max(1, math.ceil(n / max(1, target_users)))
        bounds: list[int] = []
        with self.read_engine.connect() as conn:
            for i in range(1, k):
                b = conn.execute(
                    select(profiles.c.user_id)
                    .order_by(profiles.c.user_id)
                    .offset(i * n // k)
                    .limit(1)
                ).scalar()
                if b is not None and (not bounds or b > bounds[-1]) and b > 1:
                    bounds.append(int(b))
        return ranges_from_bounds(bounds)

    # -- evaluation state -------------------------------------------------------
    def save_state(self, states: Sequence[tuple[int, dict[str, list[Any]]] | StateWrite],
                   *, merge_wake: bool = False) -> None:
        if not states:
            return
        ts = SYSTEM.now()
        ins = self._insert(user_state)
        new_wake = ins.excluded.wake_on
        wake = new_wake if not merge_wake else case(
            (user_state.c.as_of.is_(None), new_wake),  # nothing stored to keep
            (user_state.c.wake_on.is_(None), new_wake),
            (new_wake.is_(None), user_state.c.wake_on),
            (new_wake < user_state.c.wake_on, new_wake),
            else_=user_state.c.wake_on)
        rows = [StateWrite(*s) for s in states]
        as_of = user_state.c.as_of if merge_wake else ins.excluded.as_of
        # New matches replace the stored ones; unchanged ones (None) stay as stored.
        matches = ins.excluded.matches
        if merge_wake:  # a restricted run's entries go over the stored ones
            matches = (user_state.c.matches.op("||")(matches)
                       if self.engine.dialect.name == "postgresql"
                       else func.json_patch(user_state.c.matches, matches))
        full = ins.on_conflict_do_update(index_elements=["user_id"], set_={
            "matches": matches, "updated_at": ins.excluded.updated_at,
            "as_of": as_of, "wake_on": wake})
        dates = ins.on_conflict_do_update(index_elements=["user_id"], set_={
            "as_of": as_of, "wake_on": wake})
        try:
            with self.engine.begin() as conn:
                for stmt, part in ((full, [s for s in rows if s.matches is not None]),
                                   (dates, [s for s in rows if s.matches is None])):
                    if part:
                        conn.execute(stmt, [
                            {"user_id": s.user_id, "matches": s.matches or {},
                             "updated_at": ts, "as_of": None if merge_wake else s.as_of,
                             "wake_on": s.wake_on} for s in part])
        except OperationalError as exc:
            raise self._unavailable(exc) from exc

    def count_due(self, due_on: date) -> int:
        query = (select(func.count()).select_from(
            profiles.outerjoin(user_state, profiles.c.user_id == user_state.c.user_id))
            .where(_due(due_on)))
        try:
            with self.read_engine.connect() as conn:
                return int(conn.execute(query).scalar() or 0)
        except OperationalError as exc:
            raise self._unavailable(exc) from exc

    # -- audience sampling (preview / forecast) ------------------------------------
    def stream_sample(self, fraction: float, batch: int = 2000) -> Iterator[list[ProfileRow]]:
        if fraction >= 1.0:
            yield from self.stream_range(1, MAX_USER_ID, batch)
            return
        # Bernoulli sampling on the row: each user is in with probability
        # ``fraction``, independently (an unbiased estimator of the match rate).
        if self.engine.dialect.name == "postgresql":
            sampled = tablesample(profiles, func.bernoulli(fraction * 100), name="s")
            stmt = select(sampled.c.user_id, sampled.c.doc)
        else:
            cut = int(fraction * 2**63)
            stmt = select(profiles.c.user_id, profiles.c.doc).where(
                func.abs(func.random()) < cut)
        with self.read_engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=batch).execute(stmt)
            for part in result.partitions(batch):
                yield [ProfileRow(r[0], r[1], {}) for r in part]

    def estimate_count(self) -> int:
        if self.engine.dialect.name == "postgresql":
            with self.read_engine.connect() as conn:
                est = conn.execute(text(
                    "SELECT reltuples::bigint FROM pg_class WHERE relname = 'profiles'")).scalar()
            if est is not None and est > 0:
                return int(est)
        return self.count()

    def close(self) -> None:
        reads = self._replica_reads
        if reads is not None:  # the banner reads' own connections (shards.replica)
            reads.close()
        self.engine.dispose()
        if self.read_engine is not self.engine:
            self.read_engine.dispose()


def _due(due_on: date) -> Any:
    """The users due for an evaluation as of ``due_on`` (see ShardStore.scan_range)."""
    return or_(user_state.c.user_id.is_(None), user_state.c.as_of.is_(None),
               user_state.c.as_of > due_on, user_state.c.wake_on <= due_on)


def ranges_from_bounds(bounds: list[int]) -> list[tuple[int, int]]:
    """``[1, b1-1], [b1, b2-1], ..., [bk, MAX]`` — no gap, no overlap."""
    out = []
    lo = 1
    for b in bounds:
        if b > lo:
            out.append((lo, b - 1))
            lo = b
    out.append((lo, MAX_USER_ID))
    return out
