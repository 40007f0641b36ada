"""What an analyst submits for a rule (the REST API and the admin UI share it)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from datetime import date
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

KEY_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MAX_HOLDOUT = 50.0  # % of a rule's users it may hold out (channels/holdouts.py)

# -- banner / push links ----------------------------------------------------------
# Allowed: relative links (``/path``, ``?q``, ``#x``, ``path``) and absolute ones
# whose scheme is listed in KVADRUPEL_BANNER_LINK_SCHEMES (default https, http; add
# the app's own scheme there). Never ``javascript:``, ``data:``, ``vbscript:``...
DEFAULT_LINK_SCHEMES = ("https", "http")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
_IGNORED = re.compile(r"[\t\n\r]")  # a browser drops these anywhere in a URL
_TAG = re.compile(r"\{[{%#]")  # where a Jinja tag starts
_LEADING = "".join(chr(c) for c in range(0x21))
_link_schemes: frozenset[str] | None = None


def set_link_schemes(schemes: Iterable[str] | None) -> None:
    """The schemes this process allows (the API sets its settings' list; None:
    back to KVADRUPEL_BANNER_LINK_SCHEMES or the default)."""
    global _link_schemes
    _link_schemes = (
        None if schemes is None else frozenset(s.strip().lower() for s in schemes if s.strip())
    )


def link_schemes() -> frozenset[str]:
    if _link_schemes is not None:
        return _link_schemes
    raw = os.environ.get("KVADRUPEL_BANNER_LINK_SCHEMES")
    if raw is None:
        return frozenset(DEFAULT_LINK_SCHEMES)
    return frozenset(p.strip().lower() for p in raw.split(",") if p.strip())


def link_problem(link: str, schemes: Iterable[str] | None = None, *,
                 template: bool = True) -> str | None:
    """Why ``link`` may not be a banner link, or None when it may.

    ``template``: ``link`` is a Jinja template: only its literal text before the
    first ``{{``/``{%``/``{#`` is judged. When that text could still be the start
    of a scheme (e.g. empty: ``{{ profile.url }}``), the scheme is unknown until
    rendering and the link passes here — the rendered link must then be checked
    with ``template=False``.
    """
    allowed = frozenset(s.lower() for s in schemes) if schemes is not None else link_schemes()
    # As a browser reads it: leading C0 controls and spaces and every tab/newline go.
    text = _IGNORED.sub("", link).lstrip(_LEADING)
    m = _TAG.search(text) if template else None
    literal = text[: m.start()] if m else text
    scheme = _SCHEME.match(literal)
    if scheme is None:
        # No scheme yet: relative — unless a template may still complete one.
        return None
    name = scheme.group(1).lower()
    if name in allowed:
        return None
    return (
        f"link scheme {name!r} is not allowed: use a relative link or one of "
        f"{', '.join(sorted(allowed)) or '(none)'} (KVADRUPEL_BANNER_LINK_SCHEMES)"
    )


def _check_link(v: str | None) -> str | None:
    if v:
        problem = link_problem(v)
        if problem:
            raise ValueError(problem)
    return v


# -- channel options (docs/channels.md): all optional, and left out of the stored
# JSON when unset, so a rule that does not use them is stored as before.
Lang = Annotated[str, Field(pattern=r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{1,8}){0,3}$")]
Category = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_\-]{0,62}$")]
Importance = Literal["normal", "critical"]  # critical: exempt from the frequency cap


class _Optional(BaseModel):
    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for name in ("translations", "expires_at", "push", "category"):
            if data.get(name) is None:
                data.pop(name, None)
        if data.get("importance") == "normal":
            data.pop("importance")
        return data


class BannerText(BaseModel):
    """A translation of a banner (or push): the texts it replaces."""

    model_config = ConfigDict(extra="forbid")
    title: str | None = Field(default=None, min_length=1, max_length=2000)
    body: str | None = Field(default=None, max_length=20000)
    link: str | None = Field(default=None, max_length=2000)

    _link = field_validator("link")(_check_link)


class PushSpec(_Optional):
    """Also send the banner as a mobile push, once per episode (texts default to the banner's)."""

    model_config = ConfigDict(extra="forbid")
    title: str | None = Field(default=None, max_length=2000)
    body: str | None = Field(default=None, max_length=4000)
    link: str | None = Field(default=None, max_length=2000)
    translations: dict[Lang, BannerText] | None = Field(default=None, max_length=50)
    category: Category | None = None
    importance: Importance = "normal"

    _link = field_validator("link")(_check_link)


class BannerSpec(_Optional):
    model_config = ConfigDict(extra="forbid")
    title: str = Field(min_length=1, max_length=2000)
    body: str = Field(default="", max_length=20000)
    link: str = Field(default="", max_length=2000)
    translations: dict[Lang, BannerText] | None = Field(default=None, max_length=50)
    # A template giving an ISO date (end of that day) or datetime; the banner hides then.
    expires_at: str | None = Field(default=None, max_length=2000)
    push: PushSpec | None = None
    category: Category | None = None
    importance: Importance = "normal"

    _link = field_validator("link")(_check_link)


class EmailText(BaseModel):
    """A translation of an e-mail: the texts it replaces."""

    model_config = ConfigDict(extra="forbid")
    subject: str | None = Field(default=None, min_length=1, max_length=2000)
    text: str | None = Field(default=None, min_length=1, max_length=100_000)
    html: str | None = Field(default=None, max_length=200_000)


class EmailSpec(_Optional):
    model_config = ConfigDict(extra="forbid")
    subject: str = Field(min_length=1, max_length=2000)
    text: str = Field(min_length=1, max_length=100_000)
    html: str | None = Field(default=None, max_length=200_000)
    translations: dict[Lang, EmailText] | None = Field(default=None, max_length=50)
    category: Category | None = None
    importance: Importance = "normal"


VARIANT_KEY_RE = r"^[a-z0-9][a-z0-9_-]{0,31}$"
MIN_VARIANTS, MAX_VARIANTS = 2, 10


class VariantSpec(BaseModel):
    """One content variant of a rule (docs/channels.md, "Content variants"): its own
    banner (with its push) and/or e-mail, replacing the rule's for the users whose
    hash falls in its share; a part it leaves out is the rule's own."""

    model_config = ConfigDict(extra="forbid")
    key: str = Field(pattern=VARIANT_KEY_RE)
    weight: float = Field(gt=0, le=1_000_000, allow_inf_nan=False)
    banner: BannerSpec | None = None
    email: EmailSpec | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for name in ("banner", "email"):
            if data.get(name) is None:
                data.pop(name, None)
        return data


class Example(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    profile: dict[str, Any]
    as_of: date
    expect: bool


class RuleIn(BaseModel):
    """A rule as submitted. ``key`` is taken from the URL on PUT."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1, max_length=63)
    name: str = Field(min_length=1, max_length=200)
    source: str = Field(min_length=1, max_length=50_000)
    priority: int = Field(default=100, ge=0, le=1_000_000)
    group: str | None = Field(default=None, max_length=63)
    banner: BannerSpec | None = None
    email: EmailSpec | None = None
    examples: list[Example] = Field(default_factory=list, max_length=200)
    enabled: bool = True
    # Holdouts (channels/holdouts.py): the share of users, in %, this version holds out
    # (a ghost episode, nothing delivered), and the salt their assignment is hashed with
    # (None: the key; a new salt reshuffles who is held out).
    holdout: float = Field(default=0.0, ge=0.0, le=MAX_HOLDOUT, allow_inf_nan=False)
    salt: str | None = Field(default=None, min_length=1, max_length=200,
                             pattern=r"^[\x21-\x7e]+$")
    # Content variants (channels/variants.py): 2–10, each user's fixed by the hash.
    variants: list[VariantSpec] | None = Field(default=None, max_length=MAX_VARIANTS)

    @model_validator(mode="after")
    def _variants(self) -> RuleIn:
        vs = self.variants
        if not vs:
            self.variants = None
            return self
        if len(vs) < MIN_VARIANTS:
            raise ValueError(f"variants: give {MIN_VARIANTS} to {MAX_VARIANTS}, or none")
        keys = [v.key for v in vs]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"variants: keys must be unique ({', '.join(dup)} repeated)")
        for v in vs:
            if v.banner is None and v.email is None:
                raise ValueError(f"variant {v.key!r} has neither a banner nor an e-mail")
            if v.banner is not None and self.banner is None:
                raise ValueError(f"variant {v.key!r} has a banner but the rule has none")
            if v.email is not None and self.email is None:
                raise ValueError(f"variant {v.key!r} has an e-mail but the rule has none")
        return self

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        if not KEY_RE.match(v):
            raise ValueError(
                "key must be lower-case letters, digits and '-', starting with a letter or digit"
            )
        return v
