"""Helpers shared by the ingest benchmarks: scratch databases and synthetic events.

Not a benchmark itself. Databases are created on the local PostgreSQL
(``KVADRUPEL_TEST_PG``, default ``postgresql+psycopg://postgres@127.0.0.1:5432``)
with a ``kvb_`` prefix and dropped by :func:`drop_databases`.
"""

from __future__ import annotations

import os
import random
import sys
import uuid
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvadrupel.synthetic import FIRST_ID  # noqa: E402
from kvadrupel.synthetic import user as synthetic_user  # noqa: E402

PG_HOST = os.environ.get("KVADRUPEL_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")
ADMIN_DSN = PG_HOST.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
AS_OF = date(2026, 11, 24)


def admin() -> psycopg.Connection[Any]:
    return psycopg.connect(ADMIN_DSN, autocommit=True)


def create_databases(kind: str, n: int, template: str | None = None) -> list[str]:
    """``n`` fresh databases of ``kind`` ("shard" or "control"), migrated; their URLs."""
    from sqlalchemy import create_engine

    from shards.migrations import runner

    tag = uuid.uuid4().hex[:8]
    urls = []
    with admin() as conn:
        for i in range(n):
            name = f"kvb_{tag}_{kind}{i}"
            conn.execute(
                f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")
            )
            url = f"{PG_HOST}/{name}"
            if template is None:
                engine = create_engine(url)
                runner.upgrade(kind, engine)
                engine.dispose()
            urls.append(url)
    return urls


def drop_databases(urls: list[str]) -> None:
    with admin() as conn:
        for url in urls:
            conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def db_name(url: str) -> str:
    return url.rsplit("/", 1)[1]


def dsn(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def user_ids(n_users: int) -> list[int]:
    return list(range(FIRST_ID, FIRST_ID + n_users))


def profiles(n_users: int, seed: int = 7) -> Iterator[tuple[int, dict[str, Any]]]:
    rng = random.Random(seed)
    for uid in user_ids(n_users):
        yield uid, synthetic_user(uid, AS_OF, rng)


def event(i: int, uid: int, rng: random.Random) -> dict[str, Any]:
    """One realistic update: a licence/e-mail change, an order, a visit, a vehicle change."""
    day = (AS_OF - timedelta(days=rng.randint(0, 30))).isoformat()
    ev: dict[str, Any] = {"event_id": f"b-{i}", "user_id": uid, "ts": f"{day}T12:00:00Z"}
    kind = rng.random()
    if kind < 0.35:
        ev["inc"] = {"orders.total": 1}
        ev["max"] = {"orders.last_at": day}
        ev["append"] = {
            "orders.recent": {"value": {"id": i, "sum": rng.randint(100, 99999)}, "cap": 20}
        }
    elif kind < 0.6:
        ev["set"] = {
            "driver_license": {
                "expires_on": (AS_OF + timedelta(days=rng.randint(-400, 3650))).isoformat()
            }
        }
    elif kind < 0.8:
        ev["set"] = {
            "last_login": f"{day}T{rng.randint(0, 23):02d}:00:00Z",
            "device": rng.choice(["ios", "android", "web"]),
        }
        ev["inc"] = {"visits": 1}
    elif kind < 0.9:
        ev["set"] = {"email": f"user{uid}.{i}@example.org"}
        ev["min"] = {"first_seen": day}
    else:
        ev["set"] = {"vehicle.plate": f"A{rng.randint(100, 999)}BC {rng.randint(1, 199)}"}
        ev["unset"] = ["vehicle.registration_expires_on"]
    return ev


def events(n_events: int, n_users: int, seed: int = 11) -> Iterator[tuple[int, bytes]]:
    """``(user_id, JSON)`` for ``n_events`` events over ``n_users`` users, uniformly at random."""
    rng = random.Random(seed)
    ids = user_ids(n_users)
    for i in range(n_events):
        uid = ids[rng.randrange(n_users)]
        yield uid, orjson.dumps(event(i, uid, rng))
