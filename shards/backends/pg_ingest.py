"""The ingest write on PostgreSQL, through psycopg directly.

:class:`PgIngestMixin` replaces the portable ingest helpers of
:class:`~shards.backends.sql.SqlShardStore` (same transaction, same semantics):

* marks: one ``INSERT .. ON CONFLICT DO UPDATE .. RETURNING`` creates the missing
  rows and locks them (two workers replaying one partition queue there);
* load: one ``SELECT .. WHERE user_id = ANY($1)`` of ``doc::text``; no row lock,
  because the write below is conditional on the version read (optimistic): if
  any profile changed in between (a producer that did not key by user id, or a
  stray second writer), the transaction fails and the batch is retried;
* write: one statement for the whole shard's part of a batch. Which form is
  fastest was measured (``bench/bench_pg_upsert.py``, figures in
  ``docs/ingest.md``): ``unnest`` (one ``INSERT .. SELECT FROM unnest(..) ON
  CONFLICT DO UPDATE``; the documents as one newline-separated text) is the
  default; ``copy`` (COPY into a temporary table, then the same upsert from
  it), ``values`` (SQLAlchemy's multi-row VALUES) and ``executemany`` (psycopg
  pipeline) stay selectable for the benchmark.

Documents travel as JSON text; the columns are ``json`` (the text as written:
no conversion on the server; migration shard_0003).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import orjson
import psycopg
from sqlalchemy.exc import DataError, IntegrityError, OperationalError

from base.errors import StorageError
from shards.backends.sql import CachedProfile, ProfileWrite, _as_update
from shards.store import ApplyFn, IngestOutcome

if TYPE_CHECKING:  # what the mixin is mixed into, for the checker (at run time: object)
    from shards.backends.sql import SqlShardStore as _MixedInto
else:
    _MixedInto = object

__all__ = ["FORMS", "PgIngestMixin"]

FORMS = ("unnest", "copy", "values", "executemany")

_LOCK_MARKS = """
INSERT INTO ingest_marks AS m (topic, partition, "offset")
SELECT t, p, -1 FROM unnest(%b::text[], %b::int[]) AS x(t, p)
ON CONFLICT (topic, partition) DO UPDATE SET "offset" = m."offset"
RETURNING topic, partition, "offset"
"""
_SAVE_MARKS = """
UPDATE ingest_marks AS m SET "offset" = x.o
FROM unnest(%b::text[], %b::int[], %b::bigint[]) AS x(t, p, o)
WHERE m.topic = x.t AND m.partition = x.p
"""
_LOAD = """
SELECT user_id, doc::text, seen::text, version FROM profiles WHERE user_id = ANY(%s::bigint[])
"""
# The version condition makes the write conditional on what was read.
_UPSERT_TAIL = """
ON CONFLICT (user_id) DO UPDATE
   SET doc = EXCLUDED.doc, seen = EXCLUDED.seen, version = EXCLUDED.version,
       updated_at = EXCLUDED.updated_at
 WHERE profiles.version = EXCLUDED.version - 1
"""
# The documents travel as one text of newline-separated JSON (orjson never writes a
# raw newline: JSON escapes control characters in strings), split by the server;
# ids and versions as array literals. Joining bytes costs the client next to
# nothing, where binding arrays made psycopg dump every element in Python.
_UPSERT_UNNEST = (
    """
INSERT INTO profiles (user_id, doc, seen, version, updated_at)
SELECT u, d::json, s::json, v, now()
  FROM unnest(%s::bigint[], string_to_array(%s::text, E'\\n'), string_to_array(%s::text, E'\\n'),
              %s::bigint[]) AS x(u, d, s, v)
"""
    + _UPSERT_TAIL
)
_STAGE = (
    "CREATE TEMP TABLE IF NOT EXISTS kv_ingest_stage "
    "(u bigint, d text, s text, v bigint) ON COMMIT DELETE ROWS"
)
_UPSERT_STAGE = (
    """
INSERT INTO profiles (user_id, doc, seen, version, updated_at)
SELECT u, d::json, s::json, v, now() FROM kv_ingest_stage
"""
    + _UPSERT_TAIL
)
_UPSERT_ROW = (
    """
INSERT INTO profiles (user_id, doc, seen, version, updated_at)
VALUES (%s, %s::json, %s::json, %s, now())
"""
    + _UPSERT_TAIL
)

_staged: weakref.WeakSet[Any] = weakref.WeakSet()  # connections that have the stage table


def _pg(conn: Any) -> psycopg.Connection[Any]:
    """The psycopg connection under a SQLAlchemy connection (same transaction)."""
    pg: psycopg.Connection[Any] = conn.connection.driver_connection
    return pg


def _copy_text(b: bytes) -> bytes:
    # orjson never emits raw control characters, so backslashes are all COPY's
    # text format needs escaped.
    return b.replace(b"\\", b"\\\\")


class PgIngestMixin(_MixedInto):
    """Mix in before :class:`SqlShardStore` (see ``PostgresShardStore``)."""

    index: int
    ingest_form: str = "unnest"

    @property
    def _checks_versions(self) -> bool:
        return self.ingest_form in ("unnest", "copy")  # the forms that check rowcount

    _transient_errors: tuple[type[Exception], ...] = (
        OperationalError,  # SQLAlchemy's, e.g. on connect
        psycopg.OperationalError,  # includes serialization failures and deadlocks
        psycopg.InterfaceError,  # the connection is closed
    )
    _data_errors: tuple[type[Exception], ...] = (
        DataError,
        IntegrityError,
        psycopg.DataError,
        psycopg.IntegrityError,
    )

    def _lock_marks(self, conn: Any, keys: set[tuple[str, int]]) -> dict[tuple[str, int], int]:
        topics, parts = zip(*sorted(keys), strict=True)  # sorted: a fixed lock order
        cur = _pg(conn).execute(_LOCK_MARKS, (list(topics), list(parts)))
        return {(t, p): o for t, p, o in cur.fetchall()}

    def _save_marks(self, conn: Any, marks: dict[tuple[str, int], int]) -> None:
        keys = sorted(marks)
        _pg(conn).execute(
            _SAVE_MARKS, ([t for t, _ in keys], [p for _, p in keys], [marks[k] for k in keys])
        )

    def _load_for_update(self, conn: Any, user_ids: list[int]) -> dict[int, tuple[Any, Any, int]]:
        # The document stays JSON text: apply_user parses it.
        # One array literal: psycopg's list dumper would loop in Python per id.
        cur = _pg(conn).execute(_LOAD, ("{" + ",".join(map(str, user_ids)) + "}",))
        loads = orjson.loads
        return {u: (d, loads(s), v) for u, d, s, v in cur.fetchall()}

    def _apply_users(
        self, conn: Any, per_user: dict[int, list[Any]], apply: ApplyFn, out: IngestOutcome,
        fresh: dict[int, CachedProfile],
    ) -> None:
        """:meth:`SqlShardStore._apply_users` for the ``unnest`` form, without an
        object per row: the columns are built as the users are applied, and each
        document is kept only as its JSON bytes (the parsed tree is freed at once)."""
        if self.ingest_form != "unnest":
            super()._apply_users(conn, per_user, apply, out, fresh)
            return
        current = self._current(conn, per_user)
        ids: list[str] = []
        docs: list[bytes] = []
        seens: list[bytes] = []
        versions: list[str] = []
        get = current.get
        dumps = orjson.dumps
        changed = out.changed
        applied = 0
        for uid, events in per_user.items():
            state = get(uid)
            if state is None:
                upd = _as_update(apply(None, [], events))
                version = 0
            else:
                doc, seen, version = state
                upd = _as_update(apply(doc, seen or [], events))
            if upd.rejected:
                out.rejected += upd.rejected
            if upd.applied:
                applied += upd.applied
                if upd.changed:
                    changed.append(uid)
                ids.append(str(uid))
                docs.append(upd.encoded)
                seens.append(dumps(upd.seen))
                versions.append(str(version + 1))
                # seen as a tuple of str: the collector untracks such an entry
                # the first time it sees it and never scans it again.
                fresh[uid] = (upd.encoded, tuple(upd.seen), version + 1)
            elif state is not None:
                fresh[uid] = (state[0], tuple(state[1] or ()), state[2])
        out.applied += applied
        if ids:
            self._upsert(conn, ids, docs, seens, versions)

    def _upsert(self, conn: Any, ids: list[str], docs: list[bytes], seens: list[bytes],
                versions: list[str]) -> None:
        """The ``unnest`` write: ids and new versions as decimal strings, documents
        and seen ids as JSON bytes."""
        cur = _pg(conn).execute(
            _UPSERT_UNNEST,
            (
                "{" + ",".join(ids) + "}",
                b"\n".join(docs).decode(),
                b"\n".join(seens).decode(),
                "{" + ",".join(versions) + "}",
            ),
        )
        if cur.rowcount != len(ids):
            raise StorageError(
                f"shard {self.index}: {len(ids) - cur.rowcount} profile(s) changed by another "
                "writer since they were read; the batch is retried"
            )

    def _write_profiles(self, conn: Any, rows: list[ProfileWrite]) -> None:
        form = self.ingest_form
        if form == "values":
            super()._write_profiles(conn, rows)
            return
        pg = _pg(conn)
        dumps = orjson.dumps
        if form == "unnest":
            self._upsert(
                conn,
                [str(r.user_id) for r in rows],
                [r.encoded for r in rows],
                [dumps(r.seen) for r in rows],
                [str(r.version + 1) for r in rows],
            )
            return
        if form == "copy":
            if pg not in _staged:
                pg.execute(_STAGE)
                _staged.add(pg)
            blob = b"".join(
                b"%d\t%s\t%s\t%d\n"
                % (r.user_id, _copy_text(r.encoded), _copy_text(dumps(r.seen)), r.version + 1)
                for r in rows
            )
            cur = pg.cursor()
            with cur.copy("COPY kv_ingest_stage (u, d, s, v) FROM STDIN") as copy:
                copy.write(blob)
            cur.execute(_UPSERT_STAGE)
        elif form == "executemany":
            cur = pg.cursor()
            cur.executemany(
                _UPSERT_ROW,
                [
                    (r.user_id, r.encoded.decode(), dumps(r.seen).decode(), r.version + 1)
                    for r in rows
                ],
            )
            return  # rowcount is not summed over executemany: no conflict check here
        else:
            raise ValueError(f"unknown ingest form {form!r}; one of {FORMS}")
        if cur.rowcount != len(rows):
            raise StorageError(
                f"shard {self.index}: {len(rows) - cur.rowcount} profile(s) changed by another "
                "writer since they were read; the batch is retried"
            )
