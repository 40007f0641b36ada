"""Rules in the control database: create, version, enable, quarantine, test.

The REST API and the admin UI both go through :class:`RuleService`; nothing else
writes the rule tables. Every save makes a new immutable version; the rule row
points at the current one.
"""

from __future__ import annotations

import builtins
import difflib
import threading
from collections.abc import Callable
from datetime import date, datetime
from typing import Any

from sqlalchemy import Engine, func, select, update

from base.clock import SYSTEM, Clock
from base.errors import (
    ChannelError,
    Conflict,
    NotFound,
    RuleCompileError,
    RuleValidationError,
    SandboxCrash,
)
from catalogue import audience
from rules.isolation import SandboxPool
from rules.models import RuleIn
from rules.readset import read_set
from rules.remote import CHILD_MODULE, RuleRunner
from rules.ruleset import ActiveRule, RuleSpec
from rules.sandbox import compile_rule
from rules.templates import validate_template
from shards.schema import admin_audit, rule_versions, rules

__all__ = ["ActiveRule", "RuleService", "canary_mark", "check_rollout"]




class RuleService:
    def __init__(self, control: Engine, timezone: str = "Europe/Moscow", budget_ms: float = 50.0,
                 shards: Callable[[], Any] | None = None, clock: Clock = SYSTEM,
                 runner: RuleRunner | None = None) -> None:
        self.control = control
        self.clock = clock
        # Rule code (tests, examples, audience questions) runs in the sandbox's child
        # processes, never here (rules/isolation.py). Without a runner given, this
        # service starts its own pool on first use.
        self._runner = runner
        self.timezone = timezone
        self.budget_ms = budget_ms
        self._shards = shards  # the ShardSet, for audience questions (preview, forecast)
        self._lock = threading.Lock()

    @property
    def runner(self) -> RuleRunner:
        if self._runner is None:
            with self._lock:
                if self._runner is None:
                    self._runner = RuleRunner(SandboxPool(CHILD_MODULE, size=1), self.budget_ms)
        return self._runner

    # -- validation -----------------------------------------------------------
    def validate(self, rule: RuleIn) -> list[dict[str, Any]]:
        """Problems that make a rule unsavable (source or templates)."""
        problems: list[dict[str, Any]] = []
        try:
            compile_rule(rule.source, key=rule.key)
        except RuleCompileError as exc:
            problems.append({"field": "source", "line": exc.line, "message": str(exc)})
        for part_name, part in (("banner", rule.banner), ("email", rule.email)):
            if part is None:
                continue
            for field, value in part.model_dump().items():
                if value:
                    err = validate_template(value)
                    if err:
                        problems.append(
                            {"field": f"{part_name}.{field}", "line": None, "message": err}
                        )
        return problems

    def run_examples(self, rule: RuleIn) -> list[dict[str, Any]]:
        """Every example with its outcome: ``{"name", "expect", "got", "error", "ok"}``."""
        if not rule.examples:
            return []
        spec = RuleSpec(key=rule.key, version=0, source=rule.source, priority=rule.priority)
        try:
            grid = self.runner.grid([spec], [ex.profile for ex in rule.examples],
                                    [ex.as_of for ex in rule.examples], self.timezone,
                                    per_doc=True)
        except SandboxCrash as crash:
            return [{"name": ex.name, "expect": ex.expect, "got": False, "error": str(crash),
                     "ok": False} for ex in rule.examples]
        out = []
        for i, ex in enumerate(rule.examples):
            got = bool(grid.masks[i][0])
            error = grid.failure(i)
            out.append({"name": ex.name, "expect": ex.expect, "got": got, "error": error,
                        "ok": got == ex.expect and error is None})
        return out

    def _check(self, rule: RuleIn) -> list[dict[str, Any]]:
        problems = self.validate(rule)
        if problems:
            raise RuleValidationError(problems)
        results = self.run_examples(rule)
        failed = [r for r in results if not r["ok"]]
        if failed and rule.enabled:
            raise RuleValidationError([
                {"field": "examples", "line": None,
                 "message": f"example {r['name']!r}: expected {r['expect']}, got {r['got']}"
                 + (f" ({r['error']})" if r["error"] else "")}
                for r in failed
            ])
        return results

    # -- writes ---------------------------------------------------------------
    def create(self, rule: RuleIn, author: str | None = None) -> dict[str, Any]:
        self._check(rule)
        with self._lock, self.control.begin() as conn:
            exists = conn.execute(select(rules.c.key).where(rules.c.key == rule.key)).scalar()
            if exists:
                raise Conflict(
                    f"rule {rule.key!r} exists; PUT /v1/rules/{rule.key} makes a new version"
                )
            ts = self.clock.now()
            conn.execute(rules.insert().values(
                key=rule.key, version=1, enabled=rule.enabled,
                status="active" if rule.enabled else "paused",
                created_at=ts, updated_at=ts))
            self._insert_version(conn, rule, 1, author, ts)
        return self.get(rule.key)

    def update(self, key: str, rule: RuleIn, author: str | None = None) -> dict[str, Any]:
        if rule.key != key:
            raise RuleValidationError(
                [
                    {
                        "field": "key",
                        "line": None,
                        "message": f"key in body {rule.key!r} differs from URL {key!r}",
                    }
                ]
            )
        self._check(rule)
        with self._lock, self.control.begin() as conn:
            cur = conn.execute(select(rules.c.version).where(rules.c.key == key)).scalar()
            if cur is None:
                raise NotFound(f"no rule {key!r}")
            ts = self.clock.now()
            # after a rollback the current version is not the newest saved one
            version = int(conn.execute(select(func.max(rule_versions.c.version))
                                       .where(rule_versions.c.key == key)).scalar() or cur) + 1
            self._insert_version(conn, rule, version, author, ts)
            # A new version starts fresh: it clears a quarantine of the old one.
            conn.execute(
                update(rules)
                .where(rules.c.key == key)
                .values(
                    version=version,
                    enabled=rule.enabled,
                    status="active" if rule.enabled else "paused",
                    quarantine_reason=None,
                    quarantine_user=None,
                    updated_at=ts,
                    rollout=None,  # and ends a canary: the new version is for everyone
                    rollout_from=None,
                )
            )
        return self.get(key)

    def _insert_version(
        self, conn: Any, rule: RuleIn, version: int, author: str | None, ts: datetime
    ) -> None:
        conn.execute(rule_versions.insert().values(
            key=rule.key, version=version, name=rule.name, group=rule.group,
            priority=rule.priority, source=rule.source,
            banner=rule.banner.model_dump() if rule.banner else None,
            email=rule.email.model_dump() if rule.email else None,
            examples=[e.model_dump(mode="json") for e in rule.examples],
            holdout=rule.holdout, salt=rule.salt,
            variants=[v.model_dump() for v in rule.variants] if rule.variants else None,
            author=author, created_at=ts))

    def set_enabled(self, key: str, enabled: bool) -> dict[str, Any]:
        if enabled:
            current = self.get(key)
            rule = RuleIn.model_validate(
                {k: current[k] for k in RuleIn.model_fields if k in current} | {"enabled": True}
            )
            self._check(rule)
        with self.control.begin() as conn:
            res = conn.execute(update(rules).where(rules.c.key == key).values(
                enabled=enabled, status="active" if enabled else "paused",
                quarantine_reason=None, quarantine_user=None, updated_at=self.clock.now())
                .returning(rules.c.key))
            if res.first() is None:
                raise NotFound(f"no rule {key!r}")
        return self.get(key)

    def quarantine(self, key: str, version: int, reason: str, user_id: int | None) -> None:
        """Take a misbehaving version out of evaluation (a new version clears it)."""
        with self.control.begin() as conn:
            conn.execute(
                update(rules)
                .where(
                    (rules.c.key == key)
                    & (rules.c.version == version)
                    & (rules.c.status != "quarantined")
                )
                .values(
                    status="quarantined",
                    quarantine_reason=reason[:2000],
                    quarantine_user=user_id,
                    updated_at=self.clock.now(),
                )
            )

    # -- reads ----------------------------------------------------------------
    def _select(self) -> Any:
        return select(
            rules.c.key, rules.c.version, rules.c.enabled, rules.c.status,
            rules.c.quarantine_reason, rules.c.quarantine_user, rules.c.created_at,
            rules.c.updated_at, rule_versions.c.name, rule_versions.c.group,
            rule_versions.c.priority, rule_versions.c.source, rule_versions.c.banner,
            rule_versions.c.email, rule_versions.c.examples, rule_versions.c.holdout,
            rule_versions.c.salt, rule_versions.c.variants, rules.c.rollout, rules.c.rollout_from,
        ).select_from(rules.join(rule_versions, (rules.c.key == rule_versions.c.key)
                                 & (rules.c.version == rule_versions.c.version)))

    @staticmethod
    def _row(r: Any) -> dict[str, Any]:
        d = dict(r._mapping)
        d["quarantine"] = (
            {"reason": d.pop("quarantine_reason"), "user_id": d.pop("quarantine_user")}
            if d["status"] == "quarantined" else None
        )
        d.pop("quarantine_reason", None)
        d.pop("quarantine_user", None)
        for k in ("created_at", "updated_at"):
            d[k] = d[k].isoformat()
        # What the rule can read of a profile (rules/readset.py; None: any path): an
        # event that changes none of these paths does not re-evaluate it.
        reads = read_set(d["source"]) if isinstance(d.get("source"), str) else None
        d["reads"] = sorted(reads) if reads is not None else None
        return d

    def get(self, key: str) -> dict[str, Any]:
        with self.control.connect() as conn:
            r = conn.execute(self._select().where(rules.c.key == key)).first()
        if r is None:
            raise NotFound(f"no rule {key!r}")
        return self._row(r)

    def list(self) -> list[dict[str, Any]]:
        with self.control.connect() as conn:
            rows = conn.execute(self._select().order_by(rules.c.key)).all()
        return [self._row(r) for r in rows]

    # ``list`` is the method above from here on in the class body: builtins.list
    def versions(self, key: str) -> builtins.list[dict[str, Any]]:
        with self.control.connect() as conn:
            rows = conn.execute(select(rule_versions).where(rule_versions.c.key == key)
                                .order_by(rule_versions.c.version)).all()
        if not rows:
            raise NotFound(f"no rule {key!r}")
        return [dict(r._mapping) | {"created_at": r.created_at.isoformat()} for r in rows]

    def active(self) -> builtins.list[ActiveRule]:
        """Enabled, non-quarantined rules at their current version."""
        with self.control.connect() as conn:
            rows = conn.execute(
                self._select()
                .where(rules.c.enabled.is_(True) & (rules.c.status == "active"))
                .order_by(rules.c.key)
            ).all()
        bases: dict[tuple[str, int], Any] = {}
        canary = [(r.key, r.rollout_from) for r in rows if r.rollout is not None]
        if canary:
            with self.control.connect() as conn:
                for k, v in canary:
                    bases[(k, v)] = conn.execute(select(rule_versions).where(
                        (rule_versions.c.key == k) & (rule_versions.c.version == v))).first()
        out = []
        for r in rows:
            b = bases.get((r.key, r.rollout_from)) if r.rollout is not None else None
            base = (ActiveRule(b.key, b.version, b.name, b.group, b.priority, b.source,
                               b.banner, b.email, b.variants or None, b.salt)
                    if b is not None else None)
            out.append(ActiveRule(r.key, r.version, r.name, r.group, r.priority, r.source,
                                  r.banner, r.email, r.variants or None,
                                  rollout=r.rollout if base is not None else None,
                                  salt=r.salt or r.key, base=base))
        return out

    def active_versions(self) -> dict[str, int]:
        """``{key: version}`` of the active rules: what a run evaluates (engine/runs.py
        compares it with the last complete run's to sweep changed rules). A rule in a
        canary rollout gets a negative number that encodes its version, the base
        version and the share: any change of the rollout sweeps the rule (every user
        re-evaluated for it, as for a new version), so the users who move between
        versions get the answer of their new one."""
        return {r.key: canary_mark(r.version, r.base.version, r.rollout)
                if r.base is not None and r.rollout is not None else r.version
                for r in self.active()}

    def generation(self) -> tuple[Any, ...]:
        """Changes whenever any rule changes: evaluators reload when it does."""
        with self.control.connect() as conn:
            return tuple(conn.execute(select(func.count(), func.max(rules.c.updated_at),
                                             func.sum(rules.c.version),
                                             func.sum(rules.c.rollout),
                                             func.sum(rules.c.rollout_from))).one())

    def test(self, key: str, profile: dict[str, Any], as_of: date | None) -> dict[str, Any]:
        """The rule on one profile, with its content rendered, all in a sandbox child.
        A rule that kills the child answers with the error (the caller stays up)."""
        cur = self.get(key)
        day = as_of or self.clock.today(self.timezone)
        spec = RuleSpec(key=key, version=cur["version"], source=cur["source"],
                        priority=cur["priority"])
        runner = self.runner
        matched, error = runner.match(spec, profile, day, self.timezone)
        parts = {"banner": cur["banner"], "email": cur["email"]}
        rendered = runner.render(parts, profile, day, self.timezone)
        for part in parts:
            if f"{part}_error" in rendered:
                raise ChannelError(rendered[f"{part}_error"])
        return {"match": matched, "error": error,
                "banner": rendered.get("banner"), "email": rendered.get("email")}

    # -- versions and audience ----------------------------------------------------
    def version(self, key: str, version: int | None = None) -> dict[str, Any]:
        """One saved version (the current one when ``version`` is None)."""
        if version is None:
            version = self.get(key)["version"]
        with self.control.connect() as conn:
            r = conn.execute(select(rule_versions).where(
                (rule_versions.c.key == key) & (rule_versions.c.version == version))).first()
        if r is None:
            raise NotFound(f"rule {key!r} has no version {version}")
        return dict(r._mapping) | {"created_at": r.created_at.isoformat()}

    def _spec(self, key: str, version: int | None = None) -> RuleSpec:
        v = self.version(key, version)
        return RuleSpec(key=key, version=v["version"], source=v["source"], priority=v["priority"],
                        group=v["group"])

    def diff(self, key: str, v1: int, v2: int) -> dict[str, Any]:
        """What changed between two versions: a unified diff of the source and the
        other fields that differ."""
        a, b = self.version(key, v1), self.version(key, v2)
        source = "".join(difflib.unified_diff(
            a["source"].splitlines(keepends=True), b["source"].splitlines(keepends=True),
            fromfile=f"{key} v{v1}", tofile=f"{key} v{v2}"))
        fields = {
            f: {"from": a[f], "to": b[f]}
            for f in ("name", "group", "priority", "banner", "email", "examples", "holdout",
                      "salt", "variants") if a[f] != b[f]
        }
        return {"key": key, "from": v1, "to": v2, "source": source, "fields": fields}

    def _shardset(self) -> Any:
        if self._shards is None:
            raise RuntimeError("this RuleService has no shards to ask")
        return self._shards()

    def preview(self, key: str, as_of: date, sample: int | str = 20_000,
                version: int | None = None) -> dict[str, Any]:
        return audience.preview(self._shardset(), self._spec(key, version), as_of, sample,
                                self.timezone, runner=self.runner)

    def forecast(self, key: str, from_date: date, days: int, sample: int | str = 20_000,
                 version: int | None = None) -> dict[str, Any]:
        return audience.forecast(self._shardset(), self._spec(key, version), from_date, days,
                                 sample, self.timezone, runner=self.runner)

    def shadow(self, key: str, as_of: date, sample: int | str = 20_000,
               source: str | None = None, version: int | None = None,
               examples: int = audience.MAX_EXAMPLES) -> dict[str, Any]:
        """The active version against a candidate (given source, or a saved version).
        During a canary rollout the active version is the one the rollout started
        from (what everyone had): the diff is what promotion changes."""
        cur = self.get(key)
        active = self._spec(key, cur["rollout_from"] if cur["rollout"] is not None else None)
        if source is not None:
            compile_rule(source, key=key)  # refuse a broken candidate with its line
            candidate = RuleSpec(key=key, version=0, source=source, priority=active.priority,
                                 group=active.group)
        else:
            candidate = self._spec(key, version)
        return audience.shadow(self._shardset(), active, candidate, as_of, sample,
                               self.timezone, runner=self.runner, examples=examples)

    # -- lookahead (the approval rule's blast radius) -------------------------------
    def lookahead(self, key: str, start: date, days: int = audience.LOOKAHEAD_DAYS,
                  sample: int | str = 20_000, version: int | None = None,
                  max_evaluations: int = audience.MAX_LOOKAHEAD_EVALUATIONS) -> dict[str, Any]:
        """Users the rule matches on any day of ``[start, start + days]`` (each once):
        see :func:`catalogue.audience.lookahead`."""
        # Through the sandbox's children like the other audience questions, where this
        # service has them (``runner``); a local rule set under the budget otherwise.
        return audience.lookahead(self._shardset(), self._spec(key, version), start, days,
                                  sample, self.timezone, self.budget_ms,
                                  runner=getattr(self, "runner", None),
                                  max_evaluations=max_evaluations)

    def date_dependence(self, key: str, version: int | None = None) -> dict[str, Any]:
        """Whether the rule's source reads the date (no profiles read): see
        :func:`catalogue.audience.date_dependence`."""
        return audience.date_dependence(self.version(key, version)["source"])

    # -- canary rollout ---------------------------------------------------------------
    def _audit(self, conn: Any, actor: str, action: str, key: str, **detail: Any) -> None:
        conn.execute(admin_audit.insert().values(at=self.clock.now(), actor=actor,
                                                 action=action, target=f"rule:{key}",
                                                 detail=detail))

    def rollout(self, key: str, percent: Any, actor: str,
                from_version: int | None = None) -> dict[str, Any]:
        """Apply the rule's current version to ``percent`` % of the users (by the
        bucket of ``salt + "/rollout"``), the version live before to the rest; a
        running canary just changes its share (100: :meth:`promote`). Starting one
        enables the rule (its examples must pass, as for activation). The version
        the rest stay on: ``from_version``, by default the one saved before."""
        pct = check_rollout(percent)
        cur = self.get(key)
        if pct == 100 and cur["rollout"] is not None:
            return self.promote(key, actor)
        if cur["rollout"] is None:
            base = from_version if from_version is not None else cur["version"] - 1
            if base == cur["version"] or base < 1:
                raise Conflict(f"rule {key!r} v{cur['version']} has no earlier version to "
                               "keep the other users on")
            self.version(key, base)  # NotFound when it does not exist
            if pct == 100:
                raise Conflict("a canary covers 1–99 % of the users; "
                               f"POST /v1/rules/{key}/enable activates v{cur['version']} "
                               "for everyone")
            self._check(RuleIn.model_validate(
                {k: cur[k] for k in RuleIn.model_fields if k in cur} | {"enabled": True}))
        else:
            base = cur["rollout_from"]
            if from_version is not None and from_version != base:
                raise Conflict(f"rule {key!r} is in a canary from v{base}: promote or roll "
                               "it back first")
        with self._lock, self.control.begin() as conn:
            conn.execute(update(rules).where(rules.c.key == key).values(
                rollout=pct, rollout_from=base, enabled=True, status="active",
                quarantine_reason=None, quarantine_user=None, updated_at=self.clock.now()))
            self._audit(conn, actor, "rollout.set", key, version=cur["version"],
                        base=base, percent=pct, previous=cur["rollout"])
        return self.get(key)

    def promote(self, key: str, actor: str) -> dict[str, Any]:
        """End the canary: the new version for everyone."""
        cur = self.get(key)
        if cur["rollout"] is None:
            raise Conflict(f"rule {key!r} is not in a canary rollout")
        with self._lock, self.control.begin() as conn:
            conn.execute(update(rules).where(rules.c.key == key).values(
                rollout=None, rollout_from=None, updated_at=self.clock.now()))
            self._audit(conn, actor, "rollout.promote", key, version=cur["version"],
                        base=cur["rollout_from"], percent=cur["rollout"])
        return self.get(key)

    def rollback(self, key: str, actor: str) -> dict[str, Any]:
        """End the canary: everyone back on the version it started from (the newer
        version stays saved; a later save gets the next free number)."""
        cur = self.get(key)
        if cur["rollout"] is None:
            raise Conflict(f"rule {key!r} is not in a canary rollout")
        with self._lock, self.control.begin() as conn:
            conn.execute(update(rules).where(rules.c.key == key).values(
                version=cur["rollout_from"], rollout=None, rollout_from=None,
                updated_at=self.clock.now()))
            self._audit(conn, actor, "rollout.rollback", key, version=cur["rollout_from"],
                        candidate=cur["version"], percent=cur["rollout"])
        return self.get(key)


def check_rollout(value: Any) -> int:
    """A canary share: a whole number of percent, 1–100 (ValueError otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) \
            or not 1 <= value <= 100:
        raise ValueError(f"rollout must be a whole number of percent from 1 to 100, "
                         f"not {value!r}")
    return int(value)


def canary_mark(version: int, base: int, percent: int) -> int:
    """What a run records as the version of a rule in a canary (negative: never equal
    to a plain version; different for every (version, base, share))."""
    return -((version * 1_000_003 + base) * 128 + percent)
