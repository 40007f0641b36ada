"""The built-in pack extended to 50 rules of realistic shapes, for bench/bench_nightly.py.

Shapes, over the fields kvadrupel.synthetic produces (and some it leaves out,
as real profiles do): date windows (documents expiring or expired, birthdays,
anniversaries, one-day reminders), counters (orders), flags (language, region,
has a vehicle), and combinations of these, with loops, ``try/except``, string
methods and arithmetic where analysts use them. Most rules select a narrow
window of users, as notification rules do; a few are broad segments.

``RULES50`` has the shape of :data:`rules.pack.BUILTIN_RULES` (``RuleIn``
fields); ``plain_functions()`` compiles the same sources as ordinary Python
(the compute ceiling of the benchmark).
"""

from __future__ import annotations

import builtins
from typing import Any

from rules import helpers
from rules.pack import BUILTIN_RULES

__all__ = ["RULES50", "plain_functions"]

# key -> (source, priority, group, banner title, e-mail subject or None)
_EXTRA: dict[str, tuple[str, int, str | None, str, str | None]] = {
    # -- documents: date windows ------------------------------------------------
    "dl-expiring-90d": (
        """
def match(profile, ctx):
    left = days_until(get(profile, "driver_license.expires_on"), ctx)
    return left is not None and 31 <= left <= 90
""",
        105,
        "driver-license",
        "Your licence expires within three months",
        None,
    ),
    "dl-reminder-60": (
        """
def match(profile, ctx):
    return days_until(get(profile, "driver_license.expires_on"), ctx) == 60
""",
        100,
        None,
        "Two months left on your licence",
        "Your licence expires in 60 days",
    ),
    "dl-expired-long": (
        """
def match(profile, ctx):
    left = days_until(get(profile, "driver_license.expires_on"), ctx)
    return left is not None and left < -365 and not has(profile, "driver_license.renewed_on")
""",
        125,
        "driver-license",
        "Your licence expired over a year ago: an exam may be needed",
        None,
    ),
    "dl-expired-week": (
        """
def match(profile, ctx):
    left = days_until(get(profile, "driver_license.expires_on"), ctx)
    return left is not None and -7 <= left < 0
""",
        100,
        None,
        "Your licence expired last week",
        "Your licence has just expired",
    ),
    "vehicle-registration-expired": (
        """
def match(profile, ctx):
    left = days_until(get(profile, "vehicle.registration_expires_on"), ctx)
    return left is not None and -60 <= left < 0
""",
        100,
        "vehicle-registration",
        "Your vehicle registration has expired",
        None,
    ),
    "vehicle-registration-30d": (
        """
def match(profile, ctx):
    left = days_until(get(profile, "vehicle.registration_expires_on"), ctx)
    return left is not None and 15 <= left <= 30
""",
        90,
        "vehicle-registration",
        "Your vehicle registration expires within a month",
        None,
    ),
    "vehicle-reminder-7": (
        """
def match(profile, ctx):
    return days_until(get(profile, "vehicle.registration_expires_on"), ctx) == 7
""",
        100,
        None,
        "One week left on your registration",
        "Registration expires in a week",
    ),
    "insurance-expiring": (
        """
def match(profile, ctx):
    left = days_until(get(profile, "vehicle.insurance.expires_on"), ctx)
    return left is not None and 0 <= left <= 30
""",
        100,
        None,
        "Your car insurance expires soon",
        "Renew your car insurance",
    ),
    "passport-issued-recently": (
        """
def match(profile, ctx):
    since = days_since(get(profile, "passport.issued_on"), ctx)
    return since is not None and 0 <= since <= 30
""",
        80,
        None,
        "Your new passport is ready for e-services",
        None,
    ),
    "old-passport": (
        """
def match(profile, ctx):
    since = days_since(get(profile, "passport.issued_on"), ctx)
    years = age(get(profile, "birth_date"), ctx)
    return since is not None and since > 365 * 25 and years is not None and years < 45
""",
        80,
        None,
        "Check your passport's validity",
        None,
    ),
    "passport-20-soon": (
        """
def match(profile, ctx):
    birth = get(profile, "birth_date")
    if age(birth, ctx) != 19:
        return False
    left = days_until(add_months(birth, 12 * 20), ctx)
    return left is not None and 0 < left <= 30
""",
        95,
        None,
        "Your passport must be replaced next month",
        "Your passport must be replaced soon",
    ),
    "passport-45-soon": (
        """
def match(profile, ctx):
    birth = get(profile, "birth_date")
    if age(birth, ctx) != 44:
        return False
    left = days_until(add_months(birth, 12 * 45), ctx)
    return left is not None and 0 < left <= 30
""",
        95,
        None,
        "Your passport must be replaced next month",
        "Your passport must be replaced soon",
    ),
    # -- people: ages and anniversaries -------------------------------------------
    "birthday-week": (
        """
def match(profile, ctx):
    birth = date(get(profile, "birth_date"))
    if birth is None:
        return False
    years = age(birth, ctx)
    if years is None:
        return False
    left = days_until(add_months(birth, 12 * (years + 1)), ctx)
    return left is not None and 1 <= left <= 7
""",
        70,
        None,
        "Your birthday is coming",
        None,
    ),
    "round-birthday": (
        """
def match(profile, ctx):
    birth = get(profile, "birth_date")
    years = age(birth, ctx)
    return is_birthday(birth, ctx) and years is not None and years % 10 == 0
""",
        95,
        None,
        "Congratulations on your jubilee!",
        "Happy jubilee",
    ),
    "turned-18": (
        """
def match(profile, ctx):
    birth = get(profile, "birth_date")
    if age(birth, ctx) != 18:
        return False
    since = days_since(add_months(birth, 12 * 18), ctx)
    return since is not None and since <= 7
""",
        90,
        None,
        "You are 18: new services are open to you",
        "Welcome to adulthood",
    ),
    "pension-soon": (
        """
def match(profile, ctx):
    birth = get(profile, "birth_date")
    if age(birth, ctx) != 64:
        return False
    left = days_until(add_months(birth, 12 * 65), ctx)
    return left is not None and left <= 60
""",
        90,
        None,
        "Apply for your pension online",
        "Your pension application",
    ),
    "senior-driver": (
        """
def match(profile, ctx):
    years = age(get(profile, "birth_date"), ctx)
    left = days_until(get(profile, "driver_license.expires_on"), ctx)
    return years is not None and years >= 70 and left is not None and left >= 0
""",
        60,
        None,
        "Medical check for drivers over 70",
        None,
    ),
    "senior-driver-expiring": (
        """
def match(profile, ctx):
    years = age(get(profile, "birth_date"), ctx)
    left = days_until(get(profile, "driver_license.expires_on"), ctx)
    return years is not None and years >= 65 and left is not None and 0 <= left <= 90
""",
        65,
        None,
        "Renew your licence: book the medical check first",
        None,
    ),
    "young-driver": (
        """
def match(profile, ctx):
    years = age(get(profile, "birth_date"), ctx)
    return between(years, 18, 21) and has(profile, "driver_license.number")
""",
        50,
        None,
        "Safe driving tips for new drivers",
        None,
    ),
    "birthday-month": (
        """
def match(profile, ctx):
    return (month(get(profile, "birth_date")) == ctx.today.month
            and get(profile, "orders.total", 0) >= 30)
""",
        40,
        None,
        "A birthday-month gift for loyal customers",
        None,
    ),
    # -- customers: counters -------------------------------------------------------
    "new-customer": (
        """
def match(profile, ctx):
    total = get(profile, "orders.total", 0)
    since = days_since(get(profile, "orders.last_at"), ctx)
    return 1 <= total <= 2 and since is not None and since <= 14
""",
        60,
        "customer",
        "Welcome! Here is how to track your orders",
        None,
    ),
    "active-customer": (
        """
def match(profile, ctx):
    since = days_since(get(profile, "orders.last_at"), ctx)
    return since is not None and since <= 3 and get(profile, "orders.total", 0) >= 5
""",
        55,
        "customer",
        "Thanks for being with us",
        None,
    ),
    "lapsed-year": (
        """
def match(profile, ctx):
    since = days_since(get(profile, "orders.last_at"), ctx)
    return get(profile, "orders.total", 0) > 0 and since is not None and 365 <= since <= 371
""",
        50,
        "customer",
        "We miss you",
        "It has been a year",
    ),
    "inactive-6m-vip": (
        """
def match(profile, ctx):
    since = days_since(get(profile, "orders.last_at"), ctx)
    return get(profile, "orders.total", 0) >= 10 and since is not None and 180 <= since <= 186
""",
        52,
        "customer",
        "Your VIP status needs an order",
        "Keep your VIP status",
    ),
    "loyalty-milestone": (
        """
MILESTONES = (10, 25, 40)

def match(profile, ctx):
    since = days_since(get(profile, "orders.last_at"), ctx)
    return get(profile, "orders.total") in MILESTONES and since is not None and since <= 7
""",
        70,
        None,
        "Milestone reached: thank you!",
        "A thank-you for your loyalty",
    ),
    "order-anniversary": (
        """
def match(profile, ctx):
    return days_since(get(profile, "orders.last_at"), ctx) == 365
""",
        45,
        None,
        "One year since your last order",
        None,
    ),
    "vip-spender": (
        """
def match(profile, ctx):
    try:
        spend = profile["orders"]["total"] * 1500
    except (KeyError, TypeError):
        return False
    since = days_since(get(profile, "orders.last_at"), ctx)
    return spend >= 55000 and since is not None and since <= 2
""",
        58,
        None,
        "VIP offers this week",
        None,
    ),
    "no-orders-en": (
        """
def match(profile, ctx):
    return get(profile, "orders.total", 0) == 0 and get(profile, "language") == "en"
""",
        30,
        None,
        "Discover what you can order online",
        None,
    ),
    # -- flags, regions, segments ---------------------------------------------------
    "moscow-car-expiring": (
        """
REGIONS = (77, 50, 97, 99, 177, 197, 199, 777)

def match(profile, ctx):
    if profile.get("region") not in REGIONS:
        return False
    left = days_until(get(profile, "vehicle.registration_expires_on"), ctx)
    return left is not None and 0 <= left <= 60
""",
        85,
        None,
        "Moscow: renew your registration at a nearby centre",
        None,
    ),
    "plate-region-77": (
        """
def match(profile, ctx):
    plate = get(profile, "vehicle.plate")
    if not plate:
        return False
    parts = plate.split(" ")
    left = days_until(get(profile, "vehicle.registration_expires_on"), ctx)
    return (len(parts) == 2 and parts[1] in ("77", "97", "99", "177")
            and left is not None and 0 <= left <= 30)
""",
        84,
        None,
        "Registration office hours near you",
        None,
    ),
    "transport-tax": (
        """
REGIONS = (16, 23, 52, 54, 61, 63, 66, 74)

def match(profile, ctx):
    return (ctx.today.month == 11 and has(profile, "vehicle.plate")
            and get(profile, "region") in REGIONS)
""",
        75,
        None,
        "Transport tax is due on 1 December",
        None,
    ),
    "licence-and-car-soon": (
        """
def match(profile, ctx):
    dl = days_until(get(profile, "driver_license.expires_on"), ctx)
    car = days_until(get(profile, "vehicle.registration_expires_on"), ctx)
    return dl is not None and car is not None and 0 <= dl <= 60 and 0 <= car <= 60
""",
        115,
        None,
        "Both your licence and your registration expire soon",
        "Two documents expire soon",
    ),
    "car-no-valid-licence": (
        """
def match(profile, ctx):
    left = days_until(get(profile, "driver_license.expires_on"), ctx)
    car = days_until(get(profile, "vehicle.registration_expires_on"), ctx)
    return left is not None and -30 <= left < 0 and car is not None and car >= 0
""",
        118,
        None,
        "Your car is registered but your licence has expired",
        None,
    ),
    "incomplete-profile": (
        """
def match(profile, ctx):
    missing = 0
    for key in ("email", "birth_date", "passport", "driver_license"):
        if profile.get(key) is None:
            missing += 1
    return missing >= 1 and get(profile, "orders.total", 0) > 20
""",
        20,
        None,
        "Complete your profile",
        None,
    ),
    "no-email": (
        """
def match(profile, ctx):
    email = get(profile, "email")
    return not (isinstance(email, str) and "@" in email)
""",
        20,
        None,
        "Add an e-mail address to get reminders",
        None,
    ),
    "english-speakers-new": (
        """
def match(profile, ctx):
    since = days_since(get(profile, "orders.last_at"), ctx)
    return any_of(get(profile, "language"), "en", "de", "fr") and since is not None and since <= 1
""",
        35,
        None,
        "Services in English",
        None,
    ),
    "ab-bucket-7": (
        """
def match(profile, ctx):
    uid = get(profile, "user_id")
    left = days_until(get(profile, "driver_license.expires_on"), ctx)
    return isinstance(uid, int) and uid % 100 == 7 and left is not None and 0 <= left <= 120
""",
        30,
        None,
        "Try the new licence renewal flow",
        None,
    ),
    "email-domain-check": (
        """
def match(profile, ctx):
    email = get(profile, "email")
    if not isinstance(email, str):
        return False
    domain = email.lower().rsplit("@", 1)[-1]
    return domain.endswith(".invalid") or domain == "example.com"
""",
        25,
        None,
        "Please check your e-mail address",
        None,
    ),
    "region-change-needed": (
        """
def match(profile, ctx):
    region = get(profile, "region")
    plate = get(profile, "vehicle.plate", "")
    return (isinstance(region, int) and region > 85
            and isinstance(plate, str) and plate.endswith(" 1"))
""",
        25,
        None,
        "Your vehicle is registered in another region",
        None,
    ),
    "weekend-offer": (
        """
def match(profile, ctx):
    return (weekday(ctx.today) == 5 and get(profile, "region") == 77
            and get(profile, "orders.total", 0) >= 35)
""",
        20,
        None,
        "Weekend offers in Moscow",
        None,
    ),
    "recent-renewal-survey": (
        """
def match(profile, ctx):
    since = days_since(get(profile, "driver_license.renewed_on"), ctx)
    return since is not None and 15 <= since <= 21
""",
        30,
        None,
        "How was renewing your licence?",
        "Tell us about your renewal",
    ),
    "name-check": (
        """
def match(profile, ctx):
    name = get(profile, "name", "")
    return isinstance(name, str) and (len(name) < 3 or not name[:1].isupper())
""",
        15,
        None,
        "Please check the spelling of your name",
        None,
    ),
    "documents-summary": (
        """
def match(profile, ctx):
    soon = 0
    for path in ("driver_license.expires_on", "vehicle.registration_expires_on",
                 "vehicle.insurance.expires_on"):
        left = days_until(get(profile, path), ctx)
        if left is not None and 0 <= left <= 45:
            soon += 1
    return soon >= 2
""",
        110,
        None,
        "Several of your documents expire soon",
        None,
    ),
    "dl-number-missing": (
        """
def match(profile, ctx):
    return has(profile, "driver_license.expires_on") and not get(profile, "driver_license.number")
""",
        10,
        None,
        "Add your licence number",
        None,
    ),
}


def _extra_rule(key: str, spec: tuple[str, int, str | None, str, str | None]) -> dict[str, Any]:
    source, priority, group, title, subject = spec
    rule: dict[str, Any] = {
        "key": key, "name": title, "group": group, "priority": priority,
        "source": source.lstrip("\n"),
        "banner": {"title": title, "body": "", "link": "https://gosuslugi.example/"},
        "email": None, "examples": [],
    }
    if subject:
        rule["email"] = {"subject": subject,
                         "text": "Hello {{ profile.name }},\n\n" + title + ".\n", "html": None}
    return rule


RULES50: list[dict[str, Any]] = [*BUILTIN_RULES, *(_extra_rule(k, v) for k, v in _EXTRA.items())]
assert len(RULES50) == 50, len(RULES50)
assert len({r["key"] for r in RULES50}) == 50


def plain_functions(rules: list[dict[str, Any]] = RULES50) -> list[tuple[str, Any]]:
    """``[(key, match)]``: the same sources as ordinary, unsandboxed Python functions,
    in the engine's order (priority, then key)."""
    out = []
    for r in sorted(rules, key=lambda r: (-r["priority"], r["key"])):
        ns: dict[str, Any] = {"__builtins__": builtins, **helpers.HELPERS}
        exec(compile(r["source"], f"<plain:{r['key']}>", "exec"), ns)  # noqa: S102 - our own sources
        out.append((r["key"], ns["match"]))
    return out
