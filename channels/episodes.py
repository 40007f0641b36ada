"""Episodes as the delivery side sees them: what was shown, why, and until when.

A rule's episode for a user starts with an *enter* (the evaluator numbers it in
``user_state``) and ends with an *exit*; a later enter is a new episode. The
delivery worker records each in the user's shard (``episodes``: one row per
user and rule, the latest episode): the rule version, the as-of date, the
language used, the why-data (the profile fields the rule read, with their
values), the banner's expiry and the arm (``treatment``; ``holdout`` or
``control`` for a *ghost* episode of a held-out user, who is sent nothing:
channels/holdouts.py). ``GET /v1/users/{id}/banners/{banner_id}/why`` reads it back.

Writes are idempotent: a redelivered enter of the same episode changes nothing
(an episode's facts are fixed when it starts), an older episode never replaces
a newer one, and an exit only ends the episode it names.

Expiry: a banner whose ``expires_at`` passed is removed by :func:`expire_due`
(the delivery worker's periodic chore) through the shard store, so the user's
banner-set version moves and caches notice; the episode is marked ``expired``,
and a redelivered enter of it does not bring the banner back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import orjson
from sqlalchemy import and_, bindparam, select, text, update
from sqlalchemy.dialects import postgresql, sqlite

from shards.schema import banners, episodes
from shards.store import BannerChange

__all__ = ["EpisodeStart", "end_episodes", "expire_due", "read_episode", "start_episodes"]


@dataclass(frozen=True, slots=True)
class EpisodeStart:
    user_id: int
    rule_key: str
    episode: int
    version: int
    as_of: date
    lang: str | None
    why: dict[str, Any] | None
    expires_at: datetime | None
    run_id: int | None
    # treatment | holdout | control (channels/holdouts.py): holdout and control
    # episodes are ghosts, recorded but never delivered
    arm: str = "treatment"
    # the content variant (channels/variants.py) it got or, a ghost, would have got
    variant: str | None = None


_PG_START = text("""
INSERT INTO episodes (user_id, rule_key, episode, version, as_of, status, lang, why, expires_at,
                      run_id, started_at, ended_at, arm, variant)
SELECT u, r, e, v, a, 'active', l, NULLIF(w, 'null'::jsonb), x, run, :ts, NULL, arm, vt
FROM unnest(CAST(:u AS bigint[]), CAST(:r AS text[]), CAST(:e AS integer[]),
            CAST(:v AS integer[]), CAST(:a AS date[]), CAST(:l AS text[]),
            ARRAY(SELECT j FROM jsonb_array_elements(CAST(:w AS jsonb)) WITH ORDINALITY AS o(j, n)
                  ORDER BY n),
            CAST(:x AS timestamptz[]), CAST(:run AS integer[]), CAST(:arm AS text[]),
            CAST(:vt AS text[]))
     AS t(u, r, e, v, a, l, w, x, run, arm, vt)
ON CONFLICT (user_id, rule_key) DO UPDATE SET
    episode = EXCLUDED.episode, version = EXCLUDED.version, as_of = EXCLUDED.as_of,
    status = EXCLUDED.status, lang = EXCLUDED.lang, why = EXCLUDED.why,
    expires_at = EXCLUDED.expires_at, run_id = EXCLUDED.run_id, started_at = EXCLUDED.started_at,
    ended_at = NULL, arm = EXCLUDED.arm, variant = EXCLUDED.variant
WHERE episodes.episode < EXCLUDED.episode
""")


def start_episodes(store: Any, starts: Sequence[EpisodeStart], now: datetime) -> None:
    if not starts:
        return
    pg = store.engine.dialect.name == "postgresql"
    if pg:
        # One statement over arrays; a (user, rule) may appear once per statement,
        # so keep its newest episode of the batch (older ones would not apply anyway).
        latest: dict[tuple[int, str], EpisodeStart] = {}
        for st in starts:
            cur = latest.get((st.user_id, st.rule_key))
            if cur is None or st.episode >= cur.episode:
                latest[(st.user_id, st.rule_key)] = st
        rows = list(latest.values())
        with store.engine.begin() as conn:
            conn.execute(_PG_START, {
                "u": [x.user_id for x in rows], "r": [x.rule_key for x in rows],
                "e": [x.episode for x in rows], "v": [x.version for x in rows],
                "a": [x.as_of for x in rows], "l": [x.lang for x in rows],
                # One JSON array (null: no why-data); a text[] of JSON documents would
                # have every quote in them escaped, per element, by the driver.
                "w": orjson.dumps([x.why for x in rows]).decode(),
                "x": [x.expires_at for x in rows], "run": [x.run_id for x in rows],
                "arm": [x.arm for x in rows], "vt": [x.variant for x in rows], "ts": now})
        return
    ins = (postgresql.insert if pg else sqlite.insert)(episodes)
    stmt = ins.on_conflict_do_update(
        index_elements=["user_id", "rule_key"],
        set_={k: ins.excluded[k] for k in ("episode", "version", "as_of", "status", "lang", "why",
                                           "expires_at", "run_id", "started_at", "ended_at",
                                           "arm", "variant")},
        where=episodes.c.episode < ins.excluded.episode,
    )
    params = [
        {
            "user_id": s.user_id,
            "rule_key": s.rule_key,
            "episode": s.episode,
            "version": s.version,
            "as_of": s.as_of,
            "status": "active",
            "lang": s.lang,
            "why": s.why,
            "expires_at": s.expires_at,
            "run_id": s.run_id,
            "started_at": now,
            "ended_at": None,
            "arm": s.arm,
            "variant": s.variant,
        }
        for s in starts
    ]
    with store.engine.begin() as conn:
        conn.execute(stmt, params)


def end_episodes(store: Any, ends: Sequence[tuple[int, str, int]], now: datetime) -> None:
    if not ends:
        return
    with store.engine.begin() as conn:
        conn.execute(update(episodes).where(and_(
            episodes.c.user_id == bindparam("u"), episodes.c.rule_key == bindparam("r"),
            episodes.c.episode == bindparam("e"), episodes.c.status != "ended",
        )).values(status="ended", ended_at=now), [{"u": u, "r": r, "e": e} for u, r, e in ends])


def expire_due(store: Any, now: datetime, limit: int = 1000) -> list[int]:
    """Remove banners whose episode expired; return the users whose banners changed."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(episodes.c.user_id, episodes.c.rule_key, episodes.c.episode, episodes.c.version,
                   episodes.c.as_of)
            .where((episodes.c.status == "active") & (episodes.c.expires_at <= now))
            .limit(limit)).all()
    if not rows:
        return []
    changes = [
        BannerChange(int(r.user_id), r.rule_key, int(r.episode), int(r.version), 0, r.as_of, None)
        for r in rows
    ]
    changed: list[int] = store.apply_banner_changes(changes)
    with store.engine.begin() as conn:
        conn.execute(update(episodes).where(and_(
            episodes.c.user_id == bindparam("u"), episodes.c.rule_key == bindparam("r"),
            episodes.c.episode == bindparam("e"), episodes.c.status == "active",
        )).values(status="expired", ended_at=now),
            [{"u": c.user_id, "r": c.rule_key, "e": c.episode} for c in changes])
    return changed


def read_episode(store: Any, user_id: int, rule_key: str) -> dict[str, Any] | None:
    """The user's latest episode of a rule, with the banner as stored (if any)."""
    with store.engine.connect() as conn:
        ep = conn.execute(select(episodes).where(
            (episodes.c.user_id == user_id) & (episodes.c.rule_key == rule_key))).first()
        if ep is None:
            return None
        b = conn.execute(select(banners.c.id, banners.c.episode, banners.c.title, banners.c.body,
                                banners.c.link, banners.c.priority, banners.c.created_at,
                                banners.c.dismissed_at, banners.c.variant).where(
            (banners.c.user_id == user_id) & (banners.c.rule_key == rule_key))).first()
    out = dict(ep._mapping)
    out["banner"] = dict(b._mapping) if b is not None else None
    return out
