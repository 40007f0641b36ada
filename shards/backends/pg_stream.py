"""PostgreSQL fast paths of the nightly evaluation: reads by COPY, state writes by unnest,
range planning from the planner's statistics.

Reads. A range is one ``COPY (SELECT ...) TO STDOUT`` in text format on a pooled
connection: the server streams rows as fast as we take them (the socket is the
only buffer), and each row is split on tabs and its JSONB text handed to
``orjson.loads`` (bench/bench_nightly.py measured, per row on this machine: a
SQLAlchemy server-side cursor ~9 us of client CPU, binary COPY with psycopg's
jsonb loader ~6 us, this ~2.8 us). ``profiles.doc`` is ``json``: PostgreSQL keeps
the text as written, which is compact JSON from the engine (no raw tabs or
newlines, so the only COPY escape in it is a doubled backslash); a document
written by hand with whitespace between its tokens comes escaped (``\\n``,
``\\t``), and rows with a backslash go through the full COPY unescape. ``\\N`` is
NULL.

Writes. Only changed users' states are written, a batch per statement:
``INSERT ... SELECT FROM unnest(ids, docs) ON CONFLICT DO UPDATE``.

Planning. ``pg_class.reltuples`` scaled to the table's current size (what the
query planner itself does) estimates the users, and ``pg_stats.histogram_bounds``
of ``user_id`` (about 100 buckets of equal row counts) gives the boundaries,
interpolated inside a bucket when more ranges than buckets are wanted. A table
never analysed, or grown to over twice its analysed size, is analysed first
(ANALYZE reads a fixed sample, ~30k rows, not the table).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import date
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, text

from shards.copytext import parse_rows

__all__ = ["bounds_from_histogram", "plan_bounds", "save_states", "scan_range", "scan_range_text",
           "scan_users", "scan_users_text"]

_SELECT = ("SELECT p.user_id, p.doc, s.matches FROM profiles p "
           "LEFT JOIN user_state s ON s.user_id = p.user_id{s_where} WHERE {p_where}")

def _range_query(lo: int, hi: int, due_on: date | None) -> str:
    lo, hi = int(lo), int(hi)
    between = f"BETWEEN {lo} AND {hi}"
    p_where = f"p.user_id {between}"
    if due_on is not None:  # the wake-up index (ShardStore.scan_range); a date is safe text
        d = f"DATE '{date.isoformat(due_on)}'"
        p_where += (f" AND (s.user_id IS NULL OR s.as_of IS NULL OR s.as_of > {d}"
                    f" OR s.wake_on <= {d})")
    return _SELECT.format(s_where=f" AND s.user_id {between}", p_where=p_where)


def scan_range(
    engine: Engine, lo: int, hi: int, batch: int = 2000, due_on: date | None = None
) -> Iterator[list[tuple[int, Any, Any]]]:
    """``(user_id, doc, state or None)`` for ``lo <= user_id <= hi``, in lists of ``batch``."""
    yield from _copy_rows(engine, _range_query(lo, hi, due_on), batch)


def scan_users(
    engine: Engine, user_ids: Sequence[int], batch: int = 2000
) -> Iterator[list[tuple[int, Any, Any]]]:
    ids = sorted({int(u) for u in user_ids})
    for i in range(0, len(ids), 10_000):
        array = "'{" + ",".join(map(str, ids[i:i + 10_000])) + "}'::bigint[]"
        yield from _copy_rows(
            engine, _SELECT.format(s_where="", p_where=f"p.user_id = ANY({array})"), batch
        )


def scan_range_text(engine: Engine, lo: int, hi: int, batch: int = 2000,
                    due_on: date | None = None) -> Iterator[list[bytes]]:
    """The rows of :func:`scan_range` as COPY text lines, unparsed (shards/copytext.py)."""
    yield from _copy_lines(engine, _range_query(lo, hi, due_on), batch)


def scan_users_text(engine: Engine, user_ids: Sequence[int], batch: int = 2000
                    ) -> Iterator[list[bytes]]:
    ids = sorted({int(u) for u in user_ids})
    for i in range(0, len(ids), 10_000):
        array = "'{" + ",".join(map(str, ids[i:i + 10_000])) + "}'::bigint[]"
        yield from _copy_lines(
            engine, _SELECT.format(s_where="", p_where=f"p.user_id = ANY({array})"), batch
        )


def _copy_rows(engine: Engine, query: str, batch: int) -> Iterator[list[tuple[int, Any, Any]]]:
    for lines in _copy_lines(engine, query, batch):
        yield parse_rows(lines)


def _copy_lines(engine: Engine, query: str, batch: int) -> Iterator[list[bytes]]:
    raw = engine.raw_connection()
    finished = False
    try:
        conn = raw.driver_connection
        assert conn is not None  # a checked-out connection has its driver's
        rows: list[bytes] = []
        append = rows.append
        with conn.cursor() as cur, cur.copy(f"COPY ({query}) TO STDOUT") as copy:
            for data in copy:
                append(bytes(data))  # one CopyData message per row: "id\tdoc\tstate\n"
                if len(rows) >= batch:
                    yield rows
                    rows = []
                    append = rows.append
        if rows:
            yield rows
        conn.rollback()
        finished = True
    finally:
        if not finished:
            # Abandoned midway (the consumer stopped, or an error): the server may
            # still be sending; never hand such a connection back to the pool.
            raw.invalidate()
        raw.close()


def save_states(engine: Engine, states: Sequence[tuple[Any, ...]], merge_wake: bool = False
                ) -> None:
    """Upsert states — ``(user_id, matches[, as_of, wake_on])`` — in one statement
    (sorted by id, so two writers of overlapping batches lock rows in the same
    order). ``merge_wake``: keep the earlier ``wake_on`` (LEAST ignores NULL, which
    means "never") and the stored ``as_of`` (a new row gets none: due)."""
    if not states:
        return
    rows = sorted(states, key=lambda s: s[0])
    wake = ("CASE WHEN user_state.as_of IS NULL THEN EXCLUDED.wake_on "
            "ELSE LEAST(user_state.wake_on, EXCLUDED.wake_on) END"
            if merge_wake else "EXCLUDED.wake_on")
    dates = f"as_of = {'user_state.as_of' if merge_wake else 'EXCLUDED.as_of'}, wake_on = {wake}"
    with engine.begin() as conn:
        # New matches replace the stored ones; unchanged ones (None) stay as stored
        # (a user with none stored gets {}), only the dates move.
        for changed in (True, False):
            part = [s for s in rows if (s[1] is not None) is changed]
            if not part:
                continue
            conn.exec_driver_sql(
                "INSERT INTO user_state (user_id, matches, updated_at, as_of, wake_on) "
                "SELECT u, m::jsonb, now(), a, w FROM unnest(%(u)s::bigint[], %(m)s::text[], "
                "%(a)s::date[], %(w)s::date[]) AS t(u, m, a, w) "
                "ON CONFLICT (user_id) DO UPDATE SET "
                + ((f"matches = {'user_state.matches || ' if merge_wake else ''}"
                    "EXCLUDED.matches, updated_at = EXCLUDED.updated_at, ")
                   if changed else "") + dates,
                {"u": [s[0] for s in part],
                 "m": [orjson.dumps(s[1] or {}).decode() for s in part],
                 "a": [s[2] if len(s) > 2 and not merge_wake else None for s in part],
                 "w": [s[3] if len(s) > 3 else None for s in part]},
            )


def bounds_from_histogram(hist: Sequence[int], k: int) -> list[int]:
    """``k - 1`` boundaries splitting equal-count histogram buckets into ``k`` parts
    (linear inside a bucket), strictly increasing, all > 1."""
    n = len(hist) - 1
    out: list[int] = []
    if n < 1:
        return out
    for i in range(1, k):
        x = i * n / k
        j = int(x)
        b = hist[-1] if j >= n else hist[j] + int((hist[j + 1] - hist[j]) * (x - j))
        if b > 1 and (not out or b > out[-1]):
            out.append(b)
    return out


def _stats(conn: Connection) -> tuple[float, int, int, list[int] | None]:
    row = conn.execute(text(
        "SELECT c.reltuples, c.relpages, "
        "pg_relation_size(c.oid) / current_setting('block_size')::bigint "
        "FROM pg_class c WHERE c.oid = to_regclass('profiles')")).one()
    hist: Any = conn.execute(text(
        "SELECT histogram_bounds::text FROM pg_stats WHERE schemaname = current_schema() "
        "AND tablename = 'profiles' AND attname = 'user_id'")).scalar()
    bounds = [int(x) for x in hist.strip("{}").split(",") if x] if hist else None
    return float(row[0]), int(row[1]), int(row[2]), bounds


def plan_bounds(conn: Connection, target_users: int) -> tuple[list[int], int]:
    """Boundaries for ranges of about ``target_users`` users, and the estimated users."""
    reltuples, relpages, pages, hist = _stats(conn)
    if pages == 0:
        return [], 0
    if reltuples < 0 or relpages == 0 or hist is None or pages > 2 * relpages:
        conn.execute(text("ANALYZE profiles"))
        reltuples, relpages, pages, hist = _stats(conn)
    est = round(reltuples / relpages * pages) if relpages > 0 else max(0, round(reltuples))
    k = max(1, round(est / max(1, target_users)))
    if k <= 1 or not hist or len(hist) < 2:
        return [], est
    return bounds_from_histogram(hist, k), est
