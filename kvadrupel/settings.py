"""Settings from ``KVADRUPEL_*`` environment variables (12-factor).

With nothing set, everything runs embedded: SQLite files under ``data_dir``, the
in-process bus and a mail outbox folder. Production sets ``KVADRUPEL_SHARDS``,
``KVADRUPEL_CONTROL_DB``, ``KVADRUPEL_KAFKA_BOOTSTRAP`` and ``KVADRUPEL_SMTP_URL``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KVADRUPEL_", extra="ignore")

    data_dir: Path = Path("kvadrupel-data")

    # Storage. Empty means embedded SQLite files under data_dir.
    shards: Annotated[list[str], NoDecode] = Field(default_factory=list)
    shard_replicas: Annotated[list[str], NoDecode] = Field(default_factory=list)
    control_db: str = ""
    embedded_shards: int = 2
    buckets: int = 1024

    # Bus. Empty means the in-process bus.
    kafka_bootstrap: str = ""
    kafka_topic_prefix: str = "kvadrupel"
    kafka_partitions: int = 8
    kafka_session_timeout_ms: int = 45000
    kafka_heartbeat_interval_ms: int = 3000
    kafka_fetch_wait_max_ms: int = 100
    kafka_extra: dict[str, str] = Field(default_factory=dict)

    # Mail. Empty means the outbox folder under data_dir.
    smtp_url: str = ""
    smtp_username: str = ""
    smtp_password: str = ""
    smtp_timeout_s: float = 10.0
    smtp_concurrency: int = 8
    mail_from: str = "Kvadrupel <noreply@kvadrupel.local>"

    # Auth. Missing tokens are generated (and printed) by the embedded demo.
    admin_token: str = ""
    ingest_token: str = ""
    portal_token: str = ""

    # Rules and evaluation.
    timezone: str = "Europe/Moscow"
    rule_budget_ms: float = 50.0
    rule_error_rate_quarantine: float = 0.5
    rule_error_min_samples: int = 100
    range_target_users: int = 50_000

    # Ingest.
    ingest_batch_max: int = 5000
    ingest_batch_ms: int = 50
    profile_max_bytes: int = 64 * 1024

    # Scheduler.
    nightly_cron: str = "0 2 * * *"

    # API.
    banner_max_age_s: int = 30
    log_level: str = "INFO"

    _csv = field_validator("shards", "shard_replicas", mode="before")(_split_csv)

    @property
    def embedded_storage(self) -> bool:
        return not self.shards

    @property
    def embedded_bus(self) -> bool:
        return not self.kafka_bootstrap

    def shard_urls(self) -> list[str]:
        if self.shards:
            return list(self.shards)
        return [
            f"sqlite:///{(self.data_dir / f'shard{i}.db').resolve()}"
            for i in range(self.embedded_shards)
        ]

    def control_url(self) -> str:
        if self.control_db:
            return self.control_db
        return f"sqlite:///{(self.data_dir / 'control.db').resolve()}"
