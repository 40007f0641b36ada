"""Table definitions for the two kinds of database.

*Shard* databases (one per shard, identical schema) hold per-user data: the
profile document, the evaluation state per rule, the user's banners, and the
ingest high-water marks that make Kafka redelivery harmless.

The *control* database holds what is global: rules and their immutable versions,
runs and their ranges, the notification ledger, and the bucket → shard map.

One SQLAlchemy Core definition serves SQLite (embedded) and PostgreSQL
(production); JSON becomes JSONB on PostgreSQL (profiles: plain json, see
JsonText).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    Unicode,
)
from sqlalchemy.dialects.postgresql import JSON as PgJSON
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator

Json = JSON().with_variant(JSONB(), "postgresql")
# Profiles are stored and read whole, never queried inside in SQL: plain ``json``
# (the text as written) spares PostgreSQL a jsonb conversion on every write and
# read (migration shard_0003).
JsonText = JSON().with_variant(PgJSON(), "postgresql")


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on both dialects (SQLite stores no offset: we add it back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given for a UTC column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

# --------------------------------------------------------------------------- shard
shard_metadata = MetaData()

profiles = Table(
    "profiles",
    shard_metadata,
    Column("user_id", BigInteger, primary_key=True, autoincrement=False),
    Column("doc", JsonText, nullable=False),
    # The last event ids applied to this profile: a client retry is recognised and
    # applied once (see engine.ingest.events). Capped, so it costs one small column.
    Column("seen", JsonText, nullable=False),
    Column("version", BigInteger, nullable=False, default=0),
    Column("updated_at", UtcDateTime(), nullable=False),
    # Room on each page for HOT updates (ingest rewrites every changed profile).
    postgresql_with={"fillfactor": 70},
)

user_state = Table(
    "user_state",
    shard_metadata,
    Column("user_id", BigInteger, primary_key=True, autoincrement=False),
    # {rule_key: [episode, active (0/1), version, since (ISO date)]}
    Column("matches", Json, nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    # The wake-up index (shard_0004): the date the state was computed for, and the
    # earliest date an answer could change with the profile unchanged (NULL: never).
    Column("as_of", Date, nullable=True),
    Column("wake_on", Date, nullable=True, index=True),
)

banners = Table(
    "banners",
    shard_metadata,
    Column("user_id", BigInteger, nullable=False),
    Column("rule_key", Text, nullable=False),
    Column("id", Text, nullable=False),
    Column("episode", Integer, nullable=False),
    Column("version", Integer, nullable=False),
    Column("title", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("link", Text, nullable=False),
    Column("priority", Integer, nullable=False),
    Column("as_of", Date, nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("dismissed_at", UtcDateTime(), nullable=True),
    # The content variant shown (shard_0006, channels/variants.py); NULL: none.
    Column("variant", Text, nullable=True),
    PrimaryKeyConstraint("user_id", "rule_key"),
)

banner_sets = Table(
    "banner_sets",
    shard_metadata,
    # Bumped on every change of a user's banners: the API's ETag.
    Column("user_id", BigInteger, primary_key=True, autoincrement=False),
    Column("version", BigInteger, nullable=False),
)

# One row per (user, rule): the rule's latest episode as the delivery worker saw it
# (channels/episodes.py): what the user was shown and why — the rule version, the
# as-of date, the profile fields the rule read with their values — and when the
# episode's banner expires.
episodes = Table(
    "episodes",
    shard_metadata,
    Column("user_id", BigInteger, nullable=False),
    Column("rule_key", Text, nullable=False),
    Column("episode", Integer, nullable=False),
    Column("version", Integer, nullable=False),
    Column("as_of", Date, nullable=False),
    Column("status", Text, nullable=False),  # active | ended | expired
    Column("lang", Text, nullable=True),
    Column("why", Json, nullable=True),
    Column("expires_at", UtcDateTime(), nullable=True),
    Column("run_id", Integer, nullable=True),
    Column("started_at", UtcDateTime(), nullable=False),
    Column("ended_at", UtcDateTime(), nullable=True),
    # treatment | holdout | control (shard_0005, channels/holdouts.py): a holdout or
    # control episode is a *ghost*: recorded, nothing delivered. NULL: treatment.
    Column("arm", Text, nullable=True),
    # The content variant the episode got — or, a ghost, would have got (shard_0006,
    # channels/variants.py); NULL: the rule has no variants.
    Column("variant", Text, nullable=True),
    PrimaryKeyConstraint("user_id", "rule_key"),
)
Index("episodes_expiry", episodes.c.status, episodes.c.expires_at)

# Experiment history (shard_0008, channels/goals.py): one row per episode started —
# real or ghost — with its arm, kept after later episodes (``episodes`` keeps only
# the latest), and the date the rule's goal first held within its window.
goal_exposures = Table(
    "goal_exposures",
    shard_metadata,
    Column("rule_key", Text, nullable=False),
    Column("user_id", BigInteger, nullable=False),
    Column("episode", Integer, nullable=False),
    Column("version", Integer, nullable=False),
    Column("arm", Text, nullable=False),  # treatment | holdout | control
    Column("variant", Text, nullable=True),  # content variant, where the rule has them
    Column("started_on", Date, nullable=False),  # the episode's as-of date
    Column("converted_on", Date, nullable=True),
    PrimaryKeyConstraint("rule_key", "user_id", "episode"),
)

# Per-user channel preferences (channels/preferences.py): opt-outs per channel and
# per rule category, set through the API and the unsubscribe link.
preferences = Table(
    "preferences",
    shard_metadata,
    Column("user_id", BigInteger, primary_key=True, autoincrement=False),
    Column("prefs", Json, nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
)

ingest_marks = Table(
    "ingest_marks",
    shard_metadata,
    Column("topic", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    PrimaryKeyConstraint("topic", "partition"),
)

# ------------------------------------------------------------------------- control
control_metadata = MetaData()

rules = Table(
    "rules",
    control_metadata,
    Column("key", Text, primary_key=True),
    Column("version", Integer, nullable=False),
    Column("enabled", Boolean, nullable=False),
    # active | paused | quarantined (enabled is the analyst's switch, status the system's)
    Column("status", Text, nullable=False),
    Column("quarantine_reason", Text, nullable=True),
    Column("quarantine_user", BigInteger, nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    # Canary rollout (catalogue/rollout.py): ``version`` reaches ``rollout`` % of the
    # users (by bucket), the others stay on ``rollout_from``; NULL: no canary.
    Column("rollout", Integer, nullable=True),
    Column("rollout_from", Integer, nullable=True),
)

rule_versions = Table(
    "rule_versions",
    control_metadata,
    Column("key", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("name", Text, nullable=False),
    Column("group", Text, nullable=True),
    Column("priority", Integer, nullable=False),
    Column("source", Text, nullable=False),
    Column("banner", Json, nullable=True),
    Column("email", Json, nullable=True),
    Column("examples", Json, nullable=False),
    Column("author", Text, nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),
    # Holdouts (control_0007, channels/holdouts.py): the share of users (0–50 %) this
    # version holds out (ghost episodes, nothing delivered) and the salt their
    # assignment is hashed with (NULL: the rule's key).
    Column("holdout", Float, nullable=False, server_default="0"),
    Column("salt", Text, nullable=True),
    # Content variants (control_0008, channels/variants.py): [{key, weight, banner?,
    # email?}, ...] or NULL; each user's variant is fixed by the hash.
    Column("variants", Json, nullable=True),
    PrimaryKeyConstraint("key", "version"),
)

runs = Table(
    "runs",
    control_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("as_of", Date, nullable=False),
    Column("status", Text, nullable=False),  # running | done | done_with_errors | failed
    Column("ranges_total", Integer, nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("finished_at", UtcDateTime(), nullable=True),
    # Scheduling (scheduler/): nightly | manual | campaign; the rule keys a run is
    # restricted to (None: every active rule); the scheduler's firing key (unique:
    # a firing seen twice, by two replicas or after a restart, makes one run);
    # when its range jobs were handed to the bus (None: to be re-published).
    Column("kind", Text, nullable=False, server_default="manual"),
    Column("rules", Json, nullable=True),
    Column("fire_key", Text, nullable=True),
    Column("published_at", UtcDateTime(), nullable=True),
    Column("users_est", BigInteger, nullable=False, server_default="0"),
    # Incremental nights (control_0006, engine/runs.py): full | due | verify; the rule
    # keys evaluated over every user besides the users due; {key: version} evaluated.
    Column("mode", Text, nullable=False, server_default="full"),
    Column("sweep", Json, nullable=True),
    Column("covers", Json, nullable=True),
)
Index("runs_fire_key", runs.c.fire_key, unique=True)

run_ranges = Table(
    "run_ranges",
    control_metadata,
    Column("run_id", Integer, nullable=False),
    Column("range_no", Integer, nullable=False),
    Column("shard", Integer, nullable=False),
    Column("lo", BigInteger, nullable=False),
    Column("hi", BigInteger, nullable=False),
    Column("status", Text, nullable=False),  # pending | done | parked
    Column("users", Integer, nullable=False, default=0),
    Column("matches", Json, nullable=False),
    Column("errors", Json, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("error", Text, nullable=True),
    Column("updated_at", UtcDateTime(), nullable=False),
    # Progress: the planner's estimate of the users in the range; the worker
    # (host:pid) on it and since when (status "running"); changes emitted and the
    # seconds the finishing attempt took (per-worker throughput).
    Column("est_users", BigInteger, nullable=False, server_default="0"),
    Column("worker", Text, nullable=True),
    Column("started_at", UtcDateTime(), nullable=True),
    Column("enters", Integer, nullable=False, server_default="0"),
    Column("exits", Integer, nullable=False, server_default="0"),
    Column("seconds", Float, nullable=False, server_default="0"),
    # rule key -> CPU seconds it used on the range (sampled: rules/budget.py).
    Column("rule_cpu", Json, nullable=True),
    # Users evaluated for the sweep rules only; (user, rule) answers a verifying
    # pass found different from the stored state (must be 0).
    Column("swept", Integer, nullable=False, server_default="0"),
    Column("mismatches", Integer, nullable=False, server_default="0"),
    PrimaryKeyConstraint("run_id", "range_no"),
)

ledger = Table(
    "ledger",
    control_metadata,
    # The single source of truth for "was it sent": one row per
    # (user, rule, episode, channel); inserting is claiming.
    Column("user_id", BigInteger, nullable=False),
    Column("rule_key", Text, nullable=False),
    Column("episode", Integer, nullable=False),
    Column("channel", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("status", Text, nullable=False),  # pending | sent | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("error", Text, nullable=True),
    Column("run_id", Integer, nullable=True),
    Column("payload", Json, nullable=True),  # the rendered message, for retries
    Column("next_attempt_at", UtcDateTime(), nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("sent_at", UtcDateTime(), nullable=True),
    # Channels (channels/ledger.py, docs/channels.md): the message's category and
    # cap exemption, why it is held/closed unsent (quiet hours, cap, opted out, the
    # dead letter's cause), and when it reached a final status.
    Column("category", Text, nullable=True),
    Column("critical", Boolean, nullable=False, server_default="0"),
    Column("reason", Text, nullable=True),
    Column("finished_at", UtcDateTime(), nullable=True),
    PrimaryKeyConstraint("user_id", "rule_key", "episode", "channel"),
)
Index("ledger_due", ledger.c.status, ledger.c.next_attempt_at)
Index("ledger_rule", ledger.c.rule_key, ledger.c.status)
Index("ledger_run", ledger.c.run_id)

# Banner impressions and clicks per rule per day (channels/engagement.py): counted
# in memory by each API process and added here periodically.
banner_stats = Table(
    "banner_stats",
    control_metadata,
    Column("rule_key", Text, nullable=False),
    Column("day", Date, nullable=False),
    Column("impressions", BigInteger, nullable=False, server_default="0"),
    Column("clicks", BigInteger, nullable=False, server_default="0"),
    PrimaryKeyConstraint("rule_key", "day"),
)

# The same counts per content variant (control_0008, channels/variants.py), for
# banners that carry one; banner_stats keeps the rule's totals.
banner_variant_stats = Table(
    "banner_variant_stats",
    control_metadata,
    Column("rule_key", Text, nullable=False),
    Column("variant", Text, nullable=False),
    Column("day", Date, nullable=False),
    Column("impressions", BigInteger, nullable=False, server_default="0"),
    Column("clicks", BigInteger, nullable=False, server_default="0"),
    PrimaryKeyConstraint("rule_key", "variant", "day"),
)

shard_map = Table(
    "shard_map",
    control_metadata,
    Column("bucket", Integer, primary_key=True, autoincrement=False),
    Column("shard", Integer, nullable=False),
)

# Scheduled campaigns (scheduler/campaigns.py): a run of chosen rules at a chosen time.
campaigns = Table(
    "campaigns",
    control_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", Text, nullable=False),
    Column("rules", Json, nullable=True),  # rule keys; None: every active rule
    Column("at", UtcDateTime(), nullable=False),
    Column("as_of", Date, nullable=True),  # None: the date of ``at`` in the time zone
    Column("status", Text, nullable=False),  # scheduled | started | cancelled | missed
    Column("run_id", Integer, nullable=True),
    Column("error", Text, nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
)
Index("campaigns_status_at", campaigns.c.status, campaigns.c.at)

# APScheduler 3's job store (SQLAlchemyJobStore, scheduler/service.py), created by
# the migration like every other table; APScheduler's own create is then a no-op.
apscheduler_jobs = Table(
    "apscheduler_jobs",
    control_metadata,
    Column("id", Unicode(191), primary_key=True),
    Column("next_run_time", Float(25), index=True),
    Column("job_state", LargeBinary, nullable=False),
)

# Admin UI (api/admin/): accounts, the audit log, activation requests.
admin_users = Table(
    "admin_users",
    control_metadata,
    Column("username", Text, primary_key=True),
    Column("password_hash", Text, nullable=False),  # argon2id (PHC string)
    Column("role", Text, nullable=False),  # analyst | approver | admin
    Column("active", Boolean, nullable=False),
    # Part of every session cookie: bumping it signs the user out everywhere.
    Column("session_gen", Integer, nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
)

admin_audit = Table(
    "admin_audit",
    control_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", UtcDateTime(), nullable=False),
    Column("actor", Text, nullable=False),
    Column("action", Text, nullable=False),  # e.g. rule.save, activation.approve, user.add
    Column("target", Text, nullable=True),  # e.g. rule:<key>, user:<name>, run:<id>
    Column("detail", Json, nullable=False),  # what changed (a diff where there is one)
)
Index("admin_audit_target", admin_audit.c.target, admin_audit.c.id)

activation_requests = Table(
    "activation_requests",
    control_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("rule_key", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("status", Text, nullable=False),  # pending | approved | rejected | withdrawn
    Column("requested_by", Text, nullable=False),
    Column("requested_at", UtcDateTime(), nullable=False),
    Column("audience", BigInteger, nullable=True),  # blast radius when requested; None: unknown
    Column("note", Text, nullable=True),
    Column("decided_by", Text, nullable=True),
    Column("decided_at", UtcDateTime(), nullable=True),
)
Index("activation_requests_rule", activation_requests.c.rule_key, activation_requests.c.status)

# Installation-wide values an approver sets at run time (control_0007): name -> JSON
# value. ``control_group``: the global control group's share in % (channels/holdouts.py).
installation_settings = Table(
    "installation_settings",
    control_metadata,
    Column("name", Text, primary_key=True),
    Column("value", Json, nullable=False),
    Column("updated_by", Text, nullable=True),
    Column("updated_at", UtcDateTime(), nullable=False),
)
