"""What an analyst submits for a rule (the REST API and the admin UI share it)."""

from __future__ import annotations

import re
from datetime import date
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

KEY_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class BannerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str = Field(min_length=1, max_length=2000)
    body: str = Field(default="", max_length=20000)
    link: str = Field(default="", max_length=2000)


class EmailSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    subject: str = Field(min_length=1, max_length=2000)
    text: str = Field(min_length=1, max_length=100_000)
    html: str | None = Field(default=None, max_length=200_000)


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

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        if not KEY_RE.match(v):
            raise ValueError("key must be lower-case letters, digits and '-', starting with a letter or digit")
        return v
