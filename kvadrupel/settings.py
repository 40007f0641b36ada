"""Settings from ``KVADRUPEL_*`` environment variables (12-factor).

With nothing set, everything runs embedded: SQLite files under ``data_dir``, the
in-process bus and a mail outbox folder. Production sets ``KVADRUPEL_SHARDS``,
``KVADRUPEL_CONTROL_DB``, ``KVADRUPEL_KAFKA_BOOTSTRAP`` and ``KVADRUPEL_SMTP_URL``.
"""

from __future__ import annotations

from datetime import datetime
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
    # In-process bus only: keep a durable log in data_dir/bus.db, so that events
    # acknowledged with 202 (and jobs, results) survive a restart of the process;
    # false: memory only (tests, benchmarks). engine/buses/durable.py.
    bus_durable: bool = True
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
    # The embedded outbox is a development channel: fsync per message costs more than
    # the rest of a demo run, and the ledger (not the outbox) is the durable record.
    outbox_fsync: bool = False

    # Channels (docs/channels.md): retries, caps, quiet hours, push, unsubscribe links.
    delivery_max_attempts: int = 8  # then the message is failed (the dead letter)
    delivery_retry_base_s: float = 2.0  # exponential backoff with jitter from here
    delivery_retry_max_s: float = 900.0
    delivery_claim_timeout_s: float = 300.0  # a claim a crashed worker left is retried after this
    delivery_send_chunk: int = (
        200  # sends recorded per chunk: at most this many resent after a crash
    )
    channel_caps: dict[str, int] = Field(default_factory=lambda: {"email": 3, "push": 5})
    channel_cap_window_s: float = 86400.0  # rolling window of the caps
    channel_cap_policy: str = "defer"  # over the cap: defer | drop
    quiet_hours: str = ""  # e.g. "22:00-08:00" in the user's time zone; empty: none
    quiet_hours_channels: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["email", "push"]
    )
    quiet_hours_spread_s: int = 900  # held messages go out over this long after the window
    public_url: str = "http://127.0.0.1:8000"  # base of unsubscribe links
    unsubscribe_secret: str = ""  # empty: derived from the admin token
    default_language: str = "ru"  # of the unsubscribe footer when the user's is unknown
    push_provider: str = ""  # fcm | webhook; empty: no push
    push_fcm_credentials: str = ""  # service-account JSON, or the path of the file
    push_fcm_url: str = ""  # empty: https://fcm.googleapis.com
    push_webhook_url: str = ""
    push_webhook_secret: str = ""
    push_concurrency: int = 32
    push_timeout_s: float = 10.0
    engagement_flush_s: float = 5.0  # impressions/clicks: in memory, written this often
    # The global control group's share is set at run time in the control DB
    # (PUT /v1/control-group); delivery workers re-read it this often.
    control_group_refresh_s: float = 5.0

    # Auth. Missing tokens are generated (and printed) by the embedded demo.
    admin_token: str = ""
    ingest_token: str = ""
    portal_token: str = ""

    # Rules and evaluation.
    timezone: str = "Europe/Moscow"
    # Pin the one clock (base/clock.py) to this instant for drills, replays and
    # tests: an ISO date or datetime (naive: in ``timezone``); it advances in real
    # time from there. Empty: the system clock.
    clock_start: datetime | None = None
    rule_budget_ms: float = 50.0  # CPU one rule may use on one profile
    rule_batch_budget_ms: float = 1000.0  # CPU one rule may use on one batch (<= 256 profiles)
    # Rule code runs in disposable child processes (rules/isolation.py): the
    # address space each may use, and how many warm ones a process keeps.
    sandbox_memory_mb: int = 1024
    sandbox_children: int = 2
    rule_error_rate_quarantine: float = 0.5
    rule_error_min_samples: int = 100
    range_target_users: int = 50_000
    # Incremental nights (docs/scaling.md): scheduled runs evaluate only the users
    # whose answers can have changed; every N days a run also re-evaluates everyone
    # and counts what the incremental nights missed (must be 0).
    incremental: bool = True
    verify_every_days: int = 7

    # Ingest.
    ingest_batch_max: int = 10_000  # docs/ingest.md: larger batches coalesce more events per row
    ingest_batch_ms: int = 50
    ingest_pipeline: int = 3  # batches in flight per ingest worker (parse N+1 while N is written)
    ingest_dedupe_ids: int = 64  # event ids remembered per user (the duplicate window)
    ingest_cache_users: int = 100_000  # profiles an ingest process keeps (PostgreSQL; 0: off)
    profile_max_bytes: int = 64 * 1024

    # Scheduler (docs/scheduling.md). The cron takes 5 fields, or 6 with seconds first.
    nightly_cron: str = "0 2 * * *"
    scheduler_catchup_s: int = 6 * 3600  # a run missed by at most this long is run on start
    scheduler_poll_s: float = 5.0  # campaign sync, and a standby replica's leadership check
    range_max_attempts: int = 3  # a range started this often without finishing is parked

    # API.
    banner_max_age_s: int = 30
    # Schemes a banner/push ``link`` may use (besides relative links), e.g. add the
    # app's own scheme: "https,http,myapp". Checked when a rule is saved.
    banner_link_schemes: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["https", "http"]
    )
    ops_port: int = 0  # workers: /healthz, /readyz, /metrics on this port (0: off)
    shutdown_grace_s: float = 30.0
    log_level: str = "INFO"

    # Banner API (docs/api.md): mobile JWTs, version cache, long-poll, replicas, server.
    jwt_algorithms: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["HS256"])
    jwt_secret: str = ""  # HS256 shared secret; empty: HS* tokens are refused
    jwt_public_key: str = ""  # RS256/ES256 public key: PEM text or a path to a PEM file
    jwt_audience: str = ""  # when set, tokens must carry this "aud"
    jwt_issuer: str = ""  # when set, tokens must carry this "iss"
    jwt_leeway_s: int = 30
    banner_cache_users: int = 250_000  # user -> banner-set version entries per API process
    banner_cache_bodies: int = 100_000  # rendered response bodies kept per API process
    banner_longpoll_max_waiters: int = 2000  # per process; past it: 503 + Retry-After
    banner_longpoll_max_wait_s: int = 60
    replica_retry_s: float = 5.0  # a failed replica is skipped this long
    replica_max_lag_bytes: int = 1 << 20  # WAL replay lag past which reads go to the primary
    api_server: str = "granian"  # granian | uvicorn (kvadrupel api)
    api_workers: int = 2
    api_max_inflight: int = 256  # requests in flight per process; then 503 + Retry-After (0: off)

    # Admin UI (/admin/, docs/admin.md).
    admin_session_secret: str = ""  # signs session cookies; empty: random per process
    admin_session_max_age_s: int = 8 * 3600
    admin_cookie_secure: bool = False  # set true behind HTTPS (cookie gets the Secure flag)
    # Reverse proxies whose X-Forwarded-For names the client (IPs or CIDRs, comma
    # separated): the sign-in throttle counts per client address (docs/admin.md).
    admin_trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    admin_approval_audience: int = 1000  # activation above this many users needs an approver
    admin_preview_sample: int = 20_000  # users sampled for blast radius and preview (0: everyone)

    _csv = field_validator("shards", "shard_replicas", mode="before")(_split_csv)
    _csv_jwt = field_validator("jwt_algorithms", mode="before")(_split_csv)
    _csv_quiet = field_validator("quiet_hours_channels", mode="before")(_split_csv)
    _csv_links = field_validator("banner_link_schemes", mode="before")(_split_csv)
    _csv_proxies = field_validator("admin_trusted_proxies", mode="before")(_split_csv)

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
