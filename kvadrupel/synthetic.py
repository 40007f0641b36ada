"""Synthetic citizens for the demo and the benchmarks (deterministic per seed)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import date, timedelta
from typing import Any

FIRST = [
    "Anna",
    "Boris",
    "Vera",
    "Gleb",
    "Daria",
    "Egor",
    "Zoya",
    "Ivan",
    "Kira",
    "Lev",
    "Maria",
    "Nikita",
    "Olga",
    "Pavel",
    "Raisa",
    "Semyon",
    "Tatiana",
    "Ulyana",
    "Fyodor",
    "Yana",
]
LAST = ["Ivanov", "Smirnov", "Kuznetsov", "Popov", "Vasiliev", "Petrov", "Sokolov", "Mikhailov",
        "Novikov", "Fedorov", "Morozov", "Volkov", "Alekseev", "Lebedev", "Semenov", "Egorov"]

FIRST_ID = 1_000_001


def user(uid: int, as_of: date, rng: random.Random) -> dict[str, Any]:
    birth = as_of - timedelta(days=rng.randint(18 * 365, 80 * 365))
    first, last = rng.choice(FIRST), rng.choice(LAST)
    # Licences last 10 years. Most are valid (expiry spread over the next 10 years),
    # some expired lately (not renewed yet), a few long ago (stopped driving).
    roll = rng.random()
    if roll < 0.85:
        expires = as_of + timedelta(days=rng.randint(0, 3650))
    elif roll < 0.92:
        expires = as_of - timedelta(days=rng.randint(1, 180))
    else:
        expires = as_of - timedelta(days=rng.randint(181, 5 * 365))
    renewed = (
        expires - timedelta(days=3650)
        if rng.random() < 0.97
        else as_of - timedelta(days=rng.randint(0, 30))
    )
    doc: dict[str, Any] = {
        "user_id": uid,
        "name": f"{first} {last}",
        "email": f"{first.lower()}.{last.lower()}.{uid}@example.org",
        "birth_date": birth.isoformat(),
        "language": "ru" if rng.random() < 0.9 else "en",
        "region": rng.randint(1, 89),
        "driver_license": {
            "number": f"{rng.randint(10, 99)} {rng.randint(10, 99)} {rng.randint(100000, 999999)}",
            "expires_on": expires.isoformat(),
            "renewed_on": renewed.isoformat() if renewed <= as_of else None,
        },
        "passport": {
            "number": f"{rng.randint(1000, 9999)} {rng.randint(100000, 999999)}",
            "issued_on": min(
                as_of, birth + timedelta(days=365 * rng.choice([14, 20, 45]) + rng.randint(0, 400))
            ).isoformat(),
        },
        "orders": {
            "total": rng.randint(0, 40),
            "last_at": (as_of - timedelta(days=rng.randint(0, 700))).isoformat(),
        },
    }
    if rng.random() < 0.55:
        doc["vehicle"] = {
            "plate": f"{rng.choice('ABEKMHOPCTYX')}{rng.randint(100, 999)}"
            f"{rng.choice('ABEKMHOPCTYX')}{rng.choice('ABEKMHOPCTYX')} {rng.randint(1, 199)}",
            "registration_expires_on": (as_of + timedelta(days=rng.randint(-60, 700))).isoformat(),
        }
    return doc


def users(n: int, as_of: date, seed: int = 7) -> Iterator[tuple[int, dict[str, Any]]]:
    rng = random.Random(seed)
    for i in range(n):
        uid = FIRST_ID + i
        yield uid, user(uid, as_of, rng)
