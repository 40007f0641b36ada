"""The SQLAlchemy Core code shared by the SQLite and PostgreSQL shard stores."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import BigInteger, Engine, and_, case, func, literal, select, tablesample, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError

from kvadrupel.errors import ShardUnavailable
from shards.replica import BANNER_CHANNEL, notify_payloads, replica_reads
from shards.router import MAX_USER_ID
from shards.schema import banner_sets, banners, ingest_marks, profiles, user_state
from shards.store import (
    ApplyFn,
    BannerChange,
    IngestItem,
    IngestOutcome,
    ProfileRow,
    ShardStore,
)

_log = logging.getLogger("kvadrupel.shards")


def json_dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def now() -> datetime:
    return datetime.now(UTC)


def banner_id(rule_key: str, episode: int) -> str:
    return f"{rule_key}.{episode}"


class SqlShardStore(ShardStore):
    """Portable implementation; subclasses override the hot paths."""

    def __init__(self, index: int, engine: Engine, read_engine: Engine | None = None) -> None:
        self.index = index
        self.engine = engine
        self.read_engine = read_engine or engine

    # -- helpers ----------------------------------------------------------------
    def _insert(self, table: Any) -> Any:
        if self.engine.dialect.name == "postgresql":
            return postgresql.insert(table)
        return sqlite.insert(table)

    def _for_update(self, stmt: Any) -> Any:
        return stmt.with_for_update() if self.engine.dialect.name == "postgresql" else stmt

    def _unavailable(self, exc: Exception) -> ShardUnavailable:
        return ShardUnavailable(self.index, str(exc).splitlines()[0])

    # -- ingest -----------------------------------------------------------------
    def ingest(self, items: Sequence[IngestItem], apply: ApplyFn) -> IngestOutcome:
        out = IngestOutcome()
        if not items:
            return out
        try:
            with self.engine.begin() as conn:
                topics = {it.topic for it in items if it.offset >= 0}
                marks: dict[tuple[str, int], int] = {}
                if topics:
                    stmt = self._for_update(
                        select(ingest_marks).where(ingest_marks.c.topic.in_(topics))
                    )
                    marks = {(r.topic, r.partition): r.offset for r in conn.execute(stmt)}
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
                if per_user:
                    self._apply_users(conn, per_user, apply, out)
                if new_marks:
                    ins = self._insert(ingest_marks)
                    conn.execute(
                        ins.on_conflict_do_update(
                            index_elements=["topic", "partition"],
                            set_={"offset": ins.excluded.offset},
                        ),
                        [{"topic": t, "partition": p, "offset": o} for (t, p), o in new_marks.items()],
                    )
        except OperationalError as exc:
            raise self._unavailable(exc) from exc
        return out

    def _load_for_update(self, conn: Any, user_ids: list[int]) -> dict[int, tuple[Any, list[str]]]:
        stmt = self._for_update(
            select(profiles.c.user_id, profiles.c.doc, profiles.c.seen).where(
                profiles.c.user_id.in_(user_ids)
            )
        )
        return {r.user_id: (r.doc, r.seen) for r in conn.execute(stmt)}

    def _apply_users(
        self, conn: Any, per_user: dict[int, list[Any]], apply: ApplyFn, out: IngestOutcome
    ) -> None:
        current = self._load_for_update(conn, list(per_user))
        rows = []
        for uid, events in per_user.items():
            doc, seen = current.get(uid, (None, []))
            new_doc, new_seen, rejected, applied = apply(doc, list(seen or []), events)
            out.rejected += rejected
            if applied:
                out.applied += applied
                out.changed.append(uid)
                rows.append((uid, new_doc, new_seen))
        if rows:
            self._upsert_profiles(conn, rows)

    def _upsert_profiles(self, conn: Any, rows: list[tuple[int, Any, list[str]]]) -> None:
        ts = now()
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
            [{"user_id": u, "doc": d, "seen": s, "version": 1, "updated_at": ts} for u, d, s in rows],
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

    def stream_range(self, lo: int, hi: int, batch: int = 2000) -> Iterator[list[ProfileRow]]:
        last = lo - 1
        while True:
            with self.read_engine.connect() as conn:
                rows = conn.execute(
                    self._rows_query()
                    .where(and_(profiles.c.user_id > last, profiles.c.user_id <= hi))
                    .order_by(profiles.c.user_id)
                    .limit(batch)
                ).all()
            if not rows:
                return
            yield [ProfileRow(r[0], r[1], r[2] or {}) for r in rows]
            if len(rows) < batch:
                return
            last = rows[-1][0]

    def stream_users(self, user_ids: Sequence[int]) -> Iterator[list[ProfileRow]]:
        ids = sorted(set(user_ids))
        for i in range(0, len(ids), 1000):
            chunk = ids[i : i + 1000]
            with self.read_engine.connect() as conn:
                rows = conn.execute(
                    self._rows_query().where(profiles.c.user_id.in_(chunk)).order_by(profiles.c.user_id)
                ).all()
            if rows:
                yield [ProfileRow(r[0], r[1], r[2] or {}) for r in rows]

    def plan_ranges(self, target_users: int) -> list[tuple[int, int]]:
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
    def save_state(self, states: Sequence[tuple[int, dict[str, list[Any]]]]) -> None:
        if not states:
            return
        ts = now()
        ins = self._insert(user_state)
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    ins.on_conflict_do_update(
                        index_elements=["user_id"],
                        set_={"matches": ins.excluded.matches, "updated_at": ins.excluded.updated_at},
                    ),
                    [{"user_id": u, "matches": m, "updated_at": ts} for u, m in states],
                )
        except OperationalError as exc:
            raise self._unavailable(exc) from exc

    # -- banners ----------------------------------------------------------------
    def apply_banner_changes(self, changes: Sequence[BannerChange]) -> list[int]:
        if not changes:
            return []
        ts = now()
        changed: dict[int, None] = {}
        bumped: list[tuple[int, int]] = []
        try:
            with self.engine.begin() as conn:
                for ch in changes:
                    if ch.content is not None:
                        ins = self._insert(banners)
                        values = {
                            "user_id": ch.user_id,
                            "rule_key": ch.rule_key,
                            "id": banner_id(ch.rule_key, ch.episode),
                            "episode": ch.episode,
                            "version": ch.version,
                            "title": ch.content.get("title", ""),
                            "body": ch.content.get("body", ""),
                            "link": ch.content.get("link", ""),
                            "priority": ch.priority,
                            "as_of": ch.as_of,
                            "created_at": ts,
                            "dismissed_at": None,
                        }
                        # A redelivered "show" of the same episode must not reset a
                        # dismissal or the creation time: only a newer episode, or new
                        # content for the same one, replaces the row.
                        res = conn.execute(
                            ins.on_conflict_do_update(
                                index_elements=["user_id", "rule_key"],
                                set_={
                                    k: ins.excluded[k]
                                    for k in ("id", "episode", "version", "title", "body", "link",
                                              "priority", "as_of")
                                }
                                | {
                                    "created_at": case(
                                        (banners.c.episode < ins.excluded.episode,
                                         ins.excluded.created_at),
                                        else_=banners.c.created_at,
                                    ),
                                    "dismissed_at": case(
                                        (banners.c.episode < ins.excluded.episode, None),
                                        else_=banners.c.dismissed_at,
                                    ),
                                },
                                where=(banners.c.episode < ins.excluded.episode)
                                | (
                                    (banners.c.episode == ins.excluded.episode)
                                    & (
                                        (banners.c.title != ins.excluded.title)
                                        | (banners.c.body != ins.excluded.body)
                                        | (banners.c.link != ins.excluded.link)
                                        | (banners.c.priority != ins.excluded.priority)
                                    )
                                ),
                            ).returning(banners.c.user_id),
                            values,
                        )
                        # rowcount is not reliable for INSERT .. ON CONFLICT on every
                        # driver; RETURNING says exactly whether a row was written.
                        if res.first() is not None:
                            changed[ch.user_id] = None
                    else:
                        res = conn.execute(
                            banners.delete().where(
                                (banners.c.user_id == ch.user_id)
                                & (banners.c.rule_key == ch.rule_key)
                                & (banners.c.episode <= ch.episode)
                            ).returning(banners.c.user_id)
                        )
                        if res.first() is not None:
                            changed[ch.user_id] = None
                if changed:
                    bumped = self._bump_versions(conn, list(changed))
        except OperationalError as exc:
            raise self._unavailable(exc) from exc
        self._announce_banners(bumped)
        return list(changed)

    def _bump_versions(self, conn: Any, user_ids: list[int]) -> list[tuple[int, int]]:
        """Bump the users' banner-set versions; return ``[(user_id, new version)]``.

        On PostgreSQL the new versions are also announced with ``pg_notify`` in the
        same transaction: listeners (the API's version caches) hear them exactly
        when the change commits, never before, and never for a rolled-back one.
        """
        ins = self._insert(banner_sets)
        rows = conn.execute(
            ins.on_conflict_do_update(
                index_elements=["user_id"], set_={"version": banner_sets.c.version + 1}
            ).returning(banner_sets.c.user_id, banner_sets.c.version),
            [{"user_id": u, "version": 1} for u in user_ids],
        ).all()
        bumped = [(int(r[0]), int(r[1])) for r in rows]
        if bumped and self.engine.dialect.name == "postgresql":
            for payload in notify_payloads(bumped):
                conn.execute(text("SELECT pg_notify(:channel, :payload)"),
                             {"channel": BANNER_CHANNEL, "payload": payload})
        return bumped

    def add_banner_listener(self, fn: Any) -> None:
        """Call ``fn([(user_id, version), ...])`` after every committed banner change
        made through this store object (in-process invalidation, any dialect)."""
        self.__dict__.setdefault("_banner_listeners", []).append(fn)

    def remove_banner_listener(self, fn: Any) -> None:
        listeners = self.__dict__.get("_banner_listeners", [])
        if fn in listeners:
            listeners.remove(fn)

    def _announce_banners(self, bumped: list[tuple[int, int]]) -> None:
        if not bumped:
            return
        for fn in list(self.__dict__.get("_banner_listeners", ())):
            try:
                fn(bumped)
            except Exception:  # a listener must never fail the write that already committed
                _log.exception("banner listener failed on shard %d", self.index)

    def _banners_stmt(self, user_id: int) -> Any:
        # One statement, so one snapshot: the version always describes exactly the
        # rows returned (two statements under READ COMMITTED could disagree).
        me = select(literal(user_id, BigInteger).label("uid")).subquery("me")
        return (
            select(
                banner_sets.c.version,
                banners.c.id,
                banners.c.rule_key,
                banners.c.title,
                banners.c.body,
                banners.c.link,
                banners.c.priority,
                banners.c.version.label("rule_version"),
                banners.c.created_at,
            )
            .select_from(
                me.outerjoin(banner_sets, banner_sets.c.user_id == me.c.uid).outerjoin(
                    banners, (banners.c.user_id == me.c.uid) & banners.c.dismissed_at.is_(None)
                )
            )
            .order_by(banners.c.priority.desc(), banners.c.created_at, banners.c.rule_key)
        )

    def banners(self, user_id: int, min_version: int = 0) -> tuple[int, list[dict[str, Any]]]:
        """``(version, banners)``, from the replica when one is configured and it is up
        and has at least ``min_version`` for this user; otherwise from the primary."""
        stmt = self._banners_stmt(user_id)
        try:
            rows = replica_reads(self).read(
                lambda conn: conn.execute(stmt).all(),
                fresh=lambda rs: int(rs[0][0] or 0) >= min_version,
            )
        except OperationalError as exc:
            raise self._unavailable(exc) from exc
        version = int(rows[0][0] or 0)
        out = [
            {
                "id": r.id,
                "rule": r.rule_key,
                "title": r.title,
                "body": r.body,
                "link": r.link,
                "priority": r.priority,
                "rule_version": r.rule_version,
                "created_at": _utc(r.created_at).isoformat(),
            }
            for r in rows
            if r.id is not None
        ]
        return version, out

    def banner_version(self, user_id: int, min_version: int = 0) -> int:
        stmt = select(banner_sets.c.version).where(banner_sets.c.user_id == user_id)
        try:
            v = replica_reads(self).read(
                lambda conn: int(conn.execute(stmt).scalar() or 0),
                fresh=lambda v: v >= min_version,
            )
        except OperationalError as exc:
            raise self._unavailable(exc) from exc
        return int(v)

    def dismiss(self, user_id: int, bid: str) -> bool:
        bumped: list[tuple[int, int]] = []
        try:
            with self.engine.begin() as conn:
                res = conn.execute(
                    update(banners)
                    .where(
                        (banners.c.user_id == user_id)
                        & (banners.c.id == bid)
                        & banners.c.dismissed_at.is_(None)
                    )
                    .values(dismissed_at=now())
                    .returning(banners.c.user_id)
                )
                if res.first() is not None:
                    bumped = self._bump_versions(conn, [user_id])
                    found = True
                else:
                    found = bool(conn.execute(
                        select(func.count()).select_from(banners).where(
                            (banners.c.user_id == user_id) & (banners.c.id == bid)
                        )
                    ).scalar())
        except OperationalError as exc:
            raise self._unavailable(exc) from exc
        self._announce_banners(bumped)
        return found

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
        self.engine.dispose()
        if self.read_engine is not self.engine:
            self.read_engine.dispose()


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


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
