"""Per-user channel preferences: opt-outs per channel and per rule category.

Stored per user in the user's shard (``preferences`` table) as::

    {"channels":   {"email": false},              # no e-mail at all
     "categories": {"marketing": false},          # nothing of this category, any channel
     "channel_categories": {"push": {"news": false}}}   # this category, this channel

Anything not said is allowed. ``true`` entries are kept (an explicit opt-in) but
change nothing. Every channel checks :meth:`Preferences.allows` before it shows
or sends — banners when they are stored, e-mail and push right before each send
attempt (so an opt-out also stops a message that is held or being retried).

Written through ``PUT/PATCH /v1/users/{id}/preferences`` and the unsubscribe link
(:mod:`channels.unsubscribe`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

from shards.schema import preferences

__all__ = ["CHANNELS", "Preferences", "load_preferences", "merge_preferences", "normalise",
           "read_preferences", "write_preferences"]

CHANNELS = ("banner", "email", "push")
_MAX_ENTRIES = 200


def _bools(d: Any) -> dict[str, bool]:
    if not isinstance(d, Mapping):
        return {}
    return {str(k): bool(v) for k, v in list(d.items())[:_MAX_ENTRIES] if isinstance(v, bool)}


def normalise(doc: Any) -> dict[str, Any]:
    """A stored/submitted preferences document in its canonical shape."""
    doc = doc if isinstance(doc, Mapping) else {}
    cc = doc.get("channel_categories")
    return {
        "channels": {k: v for k, v in _bools(doc.get("channels")).items() if k in CHANNELS},
        "categories": _bools(doc.get("categories")),
        "channel_categories": {
            ch: _bools(v) for ch, v in (cc.items() if isinstance(cc, Mapping) else ())
            if ch in CHANNELS and _bools(v)
        },
    }


@dataclass(frozen=True, slots=True)
class Preferences:
    doc: dict[str, Any]

    @classmethod
    def of(cls, doc: Any) -> Preferences:
        return cls(normalise(doc))

    def allows(self, channel: str, category: str | None) -> tuple[bool, str | None]:
        """``(allowed, reason)``: the reason names the opt-out that applies."""
        d = self.doc
        if d["channels"].get(channel) is False:
            return False, f"opted out of {channel}"
        if category:
            if d["categories"].get(category) is False:
                return False, f"opted out of category {category}"
            if d["channel_categories"].get(channel, {}).get(category) is False:
                return False, f"opted out of {category} by {channel}"
        return True, None


ALLOW_ALL = Preferences.of({})


def load_preferences(shards: Any, user_ids: Iterable[int]) -> dict[int, Preferences]:
    """Preferences of many users, one query per shard; users without any are absent."""
    out: dict[int, Preferences] = {}
    for shard, uids in shards.router.split(set(user_ids)).items():
        store = shards.stores[shard]
        with store.read_engine.connect() as conn:
            for i in range(0, len(uids), 1000):
                for uid, doc in conn.execute(select(preferences.c.user_id, preferences.c.prefs)
                                             .where(preferences.c.user_id.in_(uids[i:i + 1000]))):
                    out[int(uid)] = Preferences.of(doc)
    return out


def read_preferences(shards: Any, user_id: int) -> dict[str, Any]:
    store = shards.for_user(user_id)
    with store.engine.connect() as conn:
        doc = conn.execute(
            select(preferences.c.prefs).where(preferences.c.user_id == user_id)
        ).scalar()
    return normalise(doc)


def _upsert(conn: Any, user_id: int, doc: dict[str, Any]) -> None:
    pg = conn.dialect.name == "postgresql"
    ins = (postgresql.insert if pg else sqlite.insert)(preferences).values(
        user_id=user_id, prefs=doc, updated_at=datetime.now(UTC))
    conn.execute(ins.on_conflict_do_update(
        index_elements=["user_id"], set_={"prefs": ins.excluded.prefs,
                                          "updated_at": ins.excluded.updated_at}))


def write_preferences(shards: Any, user_id: int, doc: Any) -> dict[str, Any]:
    """Replace a user's preferences; returns the stored document."""
    stored = normalise(doc)
    with shards.for_user(user_id).engine.begin() as conn:
        _upsert(conn, user_id, stored)
    return stored


def merge_preferences(shards: Any, user_id: int, patch: Any) -> dict[str, Any]:
    """Merge ``patch`` into the stored preferences (one transaction); returns the result."""
    patch = normalise(patch)
    with shards.for_user(user_id).engine.begin() as conn:
        stmt = select(preferences.c.prefs).where(preferences.c.user_id == user_id)
        if conn.dialect.name == "postgresql":
            stmt = stmt.with_for_update()
        doc = normalise(conn.execute(stmt).scalar())
        doc["channels"].update(patch["channels"])
        doc["categories"].update(patch["categories"])
        for ch, cats in patch["channel_categories"].items():
            doc["channel_categories"].setdefault(ch, {}).update(cats)
        _upsert(conn, user_id, doc)
    return doc
