"""The built-in rule pack: the rules every installation starts with.

Each entry is ``{"key", "name", "group", "priority", "source", "banner", "email",
"examples"}`` (the shape of :class:`rules.models.RuleIn`). Templates are Jinja2
strings rendered elsewhere (rules/templates.py) with ``profile`` and the
context's fields (``today``...). Every rule ships with examples (at least one
matching, one not) that tests/rules/test_pack.py runs.

Group "driver-license": the three licence rules exclude each other; the engine
keeps the highest priority match. Renewed (130) > expired (120) > expiring (110):
news of a renewal replaces any earlier warning, and an expired licence is more
urgent than one about to expire (those two cannot both match anyway).
"""

from __future__ import annotations

from typing import Any

__all__ = ["BUILTIN_RULES"]


def _profile(**overrides: Any) -> dict[str, Any]:
    """A complete example profile, with some parts replaced."""
    doc: dict[str, Any] = {
        "user_id": 1000001,
        "name": "Anna Ivanova",
        "email": "anna.ivanova@example.org",
        "birth_date": "1990-07-15",
        "language": "en",
        "driver_license": {
            "number": "77 12 345678",
            "expires_on": "2030-01-01",
            "renewed_on": None,
        },
        "passport": {"number": "4510 123456", "issued_on": "2010-08-01"},
        "orders": {"total": 3, "last_at": "2024-04-20"},
    }
    doc.update(overrides)
    return doc


def _dl(expires_on: str, renewed_on: str | None = None) -> dict[str, Any]:
    return {"number": "77 12 345678", "expires_on": expires_on, "renewed_on": renewed_on}


def _ex(name: str, as_of: str, expect: bool, **overrides: Any) -> dict[str, Any]:
    return {"name": name, "profile": _profile(**overrides), "as_of": as_of, "expect": expect}


def _ru_en(ru: str, en: str) -> str:
    return '{% if profile.language == "ru" %}' + ru + "{% else %}" + en + "{% endif %}"


DL_EXPIRING = '''\
"""The driver's licence expires within the next 30 days and is still valid."""

def match(profile, ctx):
    left = days_until(get(profile, "driver_license.expires_on"), ctx)
    return left is not None and 0 <= left <= 30
'''

DL_EXPIRED = '''\
"""The driver's licence has expired (its expiry date is in the past)."""

def match(profile, ctx):
    left = days_until(get(profile, "driver_license.expires_on"), ctx)
    return left is not None and left < 0
'''

DL_RENEWED = '''\
"""The driver's licence was renewed within the last 14 days and is valid."""

def match(profile, ctx):
    since = days_since(get(profile, "driver_license.renewed_on"), ctx)
    left = days_until(get(profile, "driver_license.expires_on"), ctx)
    return since is not None and 0 <= since <= 14 and left is not None and left >= 0
'''

BIRTHDAY = '''\
"""Today is the user's birthday (29 February birthdays: 28 February in common years)."""

def match(profile, ctx):
    return is_birthday(get(profile, "birth_date"), ctx)
'''

PASSPORT_REPLACE = '''\
"""The passport must be replaced at 20 and at 45: the user is 20 (or 45) and the
passport was issued before the birthday on which they reached that age."""

AGES = (20, 45)

def match(profile, ctx):
    birth = get(profile, "birth_date")
    years = age(birth, ctx)
    if years not in AGES:
        return False
    turned = add_months(birth, 12 * years)
    issued = date(get(profile, "passport.issued_on"))
    return issued is not None and turned is not None and issued < turned
'''

VEHICLE_REGISTRATION_EXPIRING = '''\
"""The vehicle registration expires within the next 14 days and is still valid."""

def match(profile, ctx):
    left = days_until(get(profile, "vehicle.registration_expires_on"), ctx)
    return left is not None and 0 <= left <= 14
'''

_LINK_DL = "https://gosuslugi.example/driver-license"

BUILTIN_RULES: list[dict[str, Any]] = [
    {
        "key": "dl-renewed",
        "name": "Driver's licence renewed",
        "group": "driver-license",
        "priority": 130,
        "source": DL_RENEWED,
        "banner": {
            "title": _ru_en(
                "Водительское удостоверение обновлено", "Your driving licence has been renewed"
            ),
            "body": _ru_en(
                "Новое удостоверение действует до {{ profile.driver_license.expires_on }}.",
                "The new licence is valid until {{ profile.driver_license.expires_on }}.",
            ),
            "link": _LINK_DL,
        },
        "email": None,
        "examples": [
            _ex(
                "renewed a week ago",
                "2024-05-10",
                True,
                driver_license=_dl("2034-05-03", "2024-05-03"),
            ),
            _ex(
                "renewed today", "2024-05-10", True, driver_license=_dl("2034-05-10", "2024-05-10")
            ),
            _ex(
                "renewed a month ago",
                "2024-05-10",
                False,
                driver_license=_dl("2034-04-10", "2024-04-10"),
            ),
            _ex("never renewed", "2024-05-10", False, driver_license=_dl("2030-01-01")),
            _ex(
                "renewed but expired",
                "2024-05-10",
                False,
                driver_license=_dl("2024-05-01", "2024-05-03"),
            ),
        ],
    },
    {
        "key": "dl-expired",
        "name": "Driver's licence expired",
        "group": "driver-license",
        "priority": 120,
        "source": DL_EXPIRED,
        "banner": {
            "title": _ru_en(
                "Срок действия водительского удостоверения истёк",
                "Your driving licence has expired",
            ),
            "body": _ru_en(
                "Удостоверение действовало до {{ profile.driver_license.expires_on }}.",
                "It was valid until {{ profile.driver_license.expires_on }}. Driving without "
                "a valid licence is an offence.",
            ),
            "link": _LINK_DL,
        },
        "email": {
            "subject": "{{ profile.name }}, your driving licence has expired",
            "text": "Hello {{ profile.name }},\n\nyour driving licence expired on "
            "{{ profile.driver_license.expires_on }}. Book a renewal: " + _LINK_DL + "\n",
            "html": "<p>Hello {{ profile.name }},</p><p>your driving licence expired on "
            "<b>{{ profile.driver_license.expires_on }}</b>. "
            '<a href="' + _LINK_DL + '">Book a renewal</a>.</p>',
        },
        "examples": [
            _ex("expired yesterday", "2024-05-10", True, driver_license=_dl("2024-05-09")),
            _ex(
                "expires today (still valid)", "2024-05-10", False, driver_license=_dl("2024-05-10")
            ),
            _ex("valid for years", "2024-05-10", False, driver_license=_dl("2031-02-01")),
            _ex("no licence", "2024-05-10", False, driver_license=None),
        ],
    },
    {
        "key": "dl-expiring",
        "name": "Driver's licence expires within 30 days",
        "group": "driver-license",
        "priority": 110,
        "source": DL_EXPIRING,
        "banner": {
            "title": _ru_en(
                "Водительское удостоверение скоро истекает", "Your driving licence expires soon"
            ),
            "body": _ru_en(
                "Срок действия истекает {{ profile.driver_license.expires_on }}.",
                "Your licence expires on {{ profile.driver_license.expires_on }}.",
            ),
            "link": _LINK_DL,
        },
        "email": {
            "subject": "Your driving licence expires on {{ profile.driver_license.expires_on }}",
            "text": "Hello {{ profile.name }},\n\nyour driving licence expires on "
            "{{ profile.driver_license.expires_on }}. Renew it online: " + _LINK_DL + "\n",
            "html": "<p>Hello {{ profile.name }},</p><p>your driving licence expires on "
            "<b>{{ profile.driver_license.expires_on }}</b>. "
            '<a href="' + _LINK_DL + '">Renew it online</a>.</p>',
        },
        "examples": [
            _ex("expires in 20 days", "2024-05-10", True, driver_license=_dl("2024-05-30")),
            _ex("expires today", "2024-05-10", True, driver_license=_dl("2024-05-10")),
            _ex("expires in 31 days", "2024-05-10", False, driver_license=_dl("2024-06-10")),
            _ex("already expired", "2024-05-10", False, driver_license=_dl("2024-05-01")),
            _ex(
                "expiry date missing",
                "2024-05-10",
                False,
                driver_license={"number": "77 12 345678"},
            ),
        ],
    },
    {
        "key": "birthday",
        "name": "Happy birthday",
        "group": None,
        "priority": 90,
        "source": BIRTHDAY,
        "banner": {
            "title": _ru_en(
                "С днём рождения, {{ profile.name }}!", "Happy birthday, {{ profile.name }}!"
            ),
            "body": "",
            "link": "",
        },
        "email": None,
        "examples": [
            _ex("birthday today", "2024-07-15", True),
            _ex("the day after", "2024-07-16", False),
            _ex(
                "29 Feb birthday on 28 Feb of a common year",
                "2023-02-28",
                True,
                birth_date="2000-02-29",
            ),
            _ex(
                "29 Feb birthday on 28 Feb of a leap year",
                "2024-02-28",
                False,
                birth_date="2000-02-29",
            ),
            _ex("no birth date", "2024-07-15", False, birth_date=None),
        ],
    },
    {
        "key": "passport-replace",
        "name": "Passport must be replaced (age 20 or 45)",
        "group": None,
        "priority": 100,
        "source": PASSPORT_REPLACE,
        "banner": {
            "title": _ru_en("Пора заменить паспорт", "Time to replace your passport"),
            "body": _ru_en(
                "Паспорт нужно заменить в 20 и в 45 лет, в течение 90 дней после дня рождения.",
                "Passports must be replaced at 20 and at 45, within 90 days of the birthday.",
            ),
            "link": "https://gosuslugi.example/passport",
        },
        "email": {
            "subject": "Your passport must be replaced",
            "text": "Hello {{ profile.name }},\n\npassports must be replaced at 20 and at 45. "
            "Yours was issued on {{ profile.passport.issued_on }}.\n",
            "html": "<p>Hello {{ profile.name }},</p>"
            "<p>passports must be replaced at 20 and at 45. "
            "Yours was issued on {{ profile.passport.issued_on }}.</p>",
        },
        "examples": [
            _ex(
                "turned 20 last week, old passport",
                "2024-05-10",
                True,
                birth_date="2004-05-03",
                passport={"number": "4518 111111", "issued_on": "2018-06-01"},
            ),
            _ex(
                "turned 45, replaced after the birthday",
                "2024-05-10",
                False,
                birth_date="1979-03-01",
                passport={"number": "4524 222222", "issued_on": "2024-03-20"},
            ),
            _ex(
                "turned 45, passport from age 20",
                "2024-05-10",
                True,
                birth_date="1979-03-01",
                passport={"number": "4599 333333", "issued_on": "1999-04-01"},
            ),
            _ex("aged 30", "2024-05-10", False, birth_date="1994-01-01"),
            _ex(
                "aged 20, no passport data",
                "2024-05-10",
                False,
                birth_date="2004-01-01",
                passport=None,
            ),
        ],
    },
    {
        "key": "vehicle-registration-expiring",
        "name": "Vehicle registration expires within 14 days",
        "group": None,
        "priority": 100,
        "source": VEHICLE_REGISTRATION_EXPIRING,
        "banner": {
            "title": _ru_en(
                "Регистрация автомобиля {{ profile.vehicle.plate }} скоро истекает",
                "The registration of {{ profile.vehicle.plate }} expires soon",
            ),
            "body": "{{ profile.vehicle.registration_expires_on }}",
            "link": "https://gosuslugi.example/vehicle",
        },
        "email": None,
        "examples": [
            _ex(
                "expires in 10 days",
                "2024-05-10",
                True,
                vehicle={"plate": "A123BC 77", "registration_expires_on": "2024-05-20"},
            ),
            _ex(
                "expires in 15 days",
                "2024-05-10",
                False,
                vehicle={"plate": "A123BC 77", "registration_expires_on": "2024-05-25"},
            ),
            _ex("no vehicle", "2024-05-10", False),
        ],
    },
]
