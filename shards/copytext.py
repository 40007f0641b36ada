"""Profile rows as PostgreSQL COPY text: ``user_id<TAB>doc<TAB>state<NEWLINE>``.

The evaluator hands rows to its sandbox child process in this form
(rules/isolation.py): on PostgreSQL they are the bytes the ``COPY ... TO STDOUT``
stream already carries, passed through without being parsed in the evaluator; on
SQLite :func:`encode_rows` makes them. :func:`parse_rows` is the one reader.
``doc`` and ``state`` are JSON; ``\\N`` is NULL; backslashes are COPY-escaped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import orjson

__all__ = ["encode_rows", "parse_rows", "row_user", "split_lines", "unescape"]

_ESCAPES = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}
_ESCAPE = re.compile(rb"\\(.)", re.S)


def unescape(field: bytes) -> bytes:
    """Undo COPY's text-format escapes (one pass, so ``\\\\n`` stays ``\\n``)."""
    return _ESCAPE.sub(lambda m: _ESCAPES.get(m.group(1), m.group(1)), field)


def parse_rows(lines: Iterable[bytes]) -> list[tuple[int, Any, Any]]:
    """``(user_id, doc, state or None)`` per line (each ending in a newline)."""
    loads = orjson.loads
    out: list[tuple[int, Any, Any]] = []
    append = out.append
    for line in lines:
        uid, doc, state = line[:-1].split(b"\t")
        if b"\\" in doc:
            doc = unescape(doc)
        if state == b"\\N":
            st = None
        else:
            st = loads(unescape(state) if b"\\" in state else state)
        append((int(uid), loads(doc), st))
    return out


def split_lines(blob: bytes) -> list[bytes]:
    """The lines of a block of rows, each with its newline."""
    return [ln + b"\n" for ln in blob.split(b"\n")[:-1]]


def row_user(line: bytes) -> int:
    return int(line[: line.index(b"\t")])


def _field(value: Any) -> bytes:
    if value is None:
        return b"\\N"
    raw = value if isinstance(value, bytes) else orjson.dumps(value)
    return raw.replace(b"\\", b"\\\\")  # orjson escapes tabs and newlines itself


def encode_rows(rows: Iterable[Any]) -> list[bytes]:
    """COPY text lines of ``(user_id, doc, state)`` rows (or rows that unpack so); a
    state of None (never evaluated) is NULL, an empty one ``{}`` (as PostgreSQL's COPY)."""
    return [b"%d\t%b\t%b\n" % (int(u), _field(d), _field(s)) for u, d, s in rows]
