"""Profile generators for the rules tests: realistic users plus odd data.

Dates cluster around ``as_of`` so every built-in rule matches some profiles, and a
share of the fields is missing, None, of the wrong type or not a valid date, so
the sandboxed and the plain evaluations are compared on awkward input too.
"""

from __future__ import annotations

import random
from datetime import date, timedelta
from typing import Any

from hypothesis import strategies as st

ODD_VALUES: list[Any] = [
    None,
    "",
    "not a date",
    "2023-02-29",
    "2024-13-01",
    20240101,
    3.5,
    True,
    [],
    {},
    ["2024-01-01"],
    {"expires_on": "2024-01-01"},
    "2024-05-10T10:00:00+03:00",
]


def _day(rng: random.Random, as_of: date, spread: int) -> str:
    return (as_of + timedelta(days=rng.randint(-spread, spread))).isoformat()


def _maybe_odd(rng: random.Random, value: Any, p: float = 0.05) -> Any:
    return rng.choice(ODD_VALUES) if rng.random() < p else value


def random_profile(rng: random.Random, as_of: date, uid: int = 1) -> dict[str, Any]:
    """A synthetic user following the documented shape, with some odd data."""
    if rng.random() < 0.1:  # born on the day (birthday rule) or on 29 February
        year = as_of.year - rng.choice([20, 45, 31, 4 + 4 * rng.randint(1, 15)])
        birth = (
            date(year, 2, 29)
            if rng.random() < 0.5 and year % 4 == 0
            else date(year, as_of.month, min(as_of.day, 28))
        )
    else:
        birth = as_of - timedelta(days=rng.randint(15 * 365, 85 * 365))
    doc: dict[str, Any] = {
        "user_id": uid,
        "name": rng.choice(["Anna Ivanova", "Boris Petrov", "Vera", ""]),
        "email": f"user{uid}@example.org",
        "birth_date": _maybe_odd(rng, birth.isoformat()),
        "language": rng.choice(["ru", "ru", "en"]),
        "driver_license": _maybe_odd(
            rng,
            {
                "number": "77 12 345678",
                "expires_on": _maybe_odd(rng, _day(rng, as_of, 90 if rng.random() < 0.6 else 4000)),
                "renewed_on": _maybe_odd(rng, _day(rng, as_of, 30) if rng.random() < 0.3 else None),
            },
        ),
        "passport": _maybe_odd(
            rng,
            {
                "number": "4510 123456",
                "issued_on": _maybe_odd(
                    rng,
                    (
                        birth
                        + timedelta(days=365 * rng.choice([14, 20, 45]) + rng.randint(-30, 400))
                    ).isoformat(),
                ),
            },
        ),
        "orders": {"total": rng.randint(0, 40), "last_at": _day(rng, as_of, 700)},
    }
    if rng.random() < 0.6:
        doc["vehicle"] = _maybe_odd(
            rng,
            {
                "plate": "A123BC 77",
                "registration_expires_on": _maybe_odd(rng, _day(rng, as_of, 60)),
            },
        )
    for key in list(doc):
        if key != "user_id" and rng.random() < 0.02:
            del doc[key]
    return doc


# Any JSON document, with keys that the built-in rules look for.
_keys = st.sampled_from(
    [
        "driver_license",
        "expires_on",
        "renewed_on",
        "birth_date",
        "passport",
        "issued_on",
        "vehicle",
        "registration_expires_on",
        "orders",
        "0",
        "x",
    ]
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.dates().map(date.isoformat),
)
json_values = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(_keys, st.text(max_size=5)), children, max_size=5),
    ),
    max_leaves=20,
)
json_profiles = st.dictionaries(_keys, json_values, max_size=8)
