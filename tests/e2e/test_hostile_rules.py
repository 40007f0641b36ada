"""Hostile rules beside the built-in pack, on PostgreSQL + the broker + SMTP.

Given the built-in pack and two hostile rules — one that segfaults CPython (a
tuple nested 150,000 deep, hashed) and one that allocates past the sandbox's
memory limit — activated in a deployment whose evaluator is a real
``kvadrupel evaluate`` process, when the API's test panel runs them and a
nightly run goes over every user, then:

* the API answers the test with the error and stays up;
* the run completes; every other rule's banners and e-mails are exactly those
  of a reference evaluation without the hostile rules;
* both hostile rules are quarantined with a reason and a user;
* the evaluator process is the same one at the end (no crash loop), and the
  sandbox deaths were counted.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.app import create_app
from base.clock import Clock
from engine.evaluate.evaluation import CompiledPack
from kvadrupel.container import Container
from kvadrupel.demo import install_pack
from kvadrupel.settings import Settings
from rules.context import make_context
from rules.models import RuleIn
from rules.pack import BUILTIN_RULES
from scheduler.planner import start_run
from shards.schema import banners
from tests.faults.test_evaluator_crash import ROOT, env_of
from tests.fixtures.procs import stop_all
from tests.fixtures.waiting import scaled, wait_for
from tests.scheduler.helpers import AS_OF, AS_OF_MIDNIGHT, TOKENS, load_users

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.slow]

N = 1_500
SEGFAULT = RuleIn(key="segfault", name="segfault", source="""
def match(profile, ctx):
    t = ()
    for i in range(150000):
        t = (t,)
    return t in {1: 1}
""")
# Each string stays under the text guard; together they pass the 256 MB address
# space this deployment gives a sandbox child, well inside the 50 ms budget.
MEMORY_BOMB = RuleIn(key="memory-bomb", name="memory bomb", source="""
def match(profile, ctx):
    hoard = []
    for i in range(5000):
        hoard.append('x' * 99990 + str(i))
    return len(hoard) > 0
""")


def test_hostile_rules_are_contained_and_everything_else_is_exact(
    pg_factory, kafka_broker, smtp_server, tmp_path: Path  # noqa: ANN001
) -> None:
    dbs = pg_factory(2)
    s = Settings(data_dir=tmp_path / "data", shards=dbs.shards, control_db=dbs.control,
                 kafka_bootstrap=kafka_broker.bootstrap,
                 kafka_topic_prefix=f"t{uuid.uuid4().hex[:8]}", kafka_partitions=4,
                 kafka_session_timeout_ms=2000, kafka_heartbeat_interval_ms=500,
                 kafka_fetch_wait_max_ms=20, range_target_users=500,
                 smtp_url=smtp_server.url, sandbox_memory_mb=256, rule_budget_ms=500,
                 clock_start=AS_OF_MIDNIGHT, **TOKENS)
    c = Container(s, clock=Clock.pinned(AS_OF, s.timezone))
    c.migrate()
    install_pack(c.rules, BUILTIN_RULES)
    docs = load_users(c, N)
    reference = CompiledPack(c.rules.active(), 0)  # trusted built-ins only, in this process
    ctx = make_context(AS_OF, s.timezone)
    want = {uid: reference.resolve_groups(reference.ruleset.evaluate(doc, ctx).matched)
            for uid, doc in docs.items()}
    for bad in (SEGFAULT, MEMORY_BOMB):
        c.rules.create(bad)
    # A generous per-profile budget, so that building the deep tuple always ends
    # in the crash (under load it could otherwise end in a timeout first).
    env = env_of(s) | {"KVADRUPEL_SANDBOX_MEMORY_MB": "256", "KVADRUPEL_RULE_BUDGET_MS": "500",
                       "KVADRUPEL_CLOCK_START": AS_OF_MIDNIGHT.isoformat()}
    evaluator = subprocess.Popen([sys.executable, "-m", "kvadrupel.cli", "evaluate"],
                                 env=env, cwd=ROOT)
    stop = threading.Event()
    threads = [c.delivery_worker().start_thread(stop)]
    admin = {"Authorization": f"Bearer {TOKENS['admin_token']}"}
    try:
        # The API's test panel runs the segfaulting rule: an answer, not a dead API
        with TestClient(create_app(c)) as client:
            r = client.post("/v1/rules/segfault/test", json={"profile": {}, "as_of": "2026-11-24"},
                            headers=admin)
            assert r.status_code in (200, 422), r.text
            assert "SIGSEGV" in r.text or "sandbox" in r.text, r.text
            assert client.get("/healthz").status_code == 200

        time.sleep(scaled(3))  # the evaluator joins the group
        run_id = start_run(c.shards, c.runs, c.bus, AS_OF, s.range_target_users)
        info = c.runs.wait(run_id, timeout=scaled(120))
        assert info["status"] == "done", info
        assert info["users"] == N and info["ranges"]["parked"] == 0
        counts = Counter(k for ks in want.values() for k in ks)
        assert {k: v for k, v in info["matches"].items() if v} == dict(counts)

        # Both hostile rules are quarantined, with a reason and a user
        seg = c.rules.get("segfault")
        assert seg["status"] == "quarantined", seg
        assert "sandbox process" in seg["quarantine"]["reason"], seg["quarantine"]
        assert seg["quarantine"]["user_id"] in docs
        bomb = c.rules.get("memory-bomb")
        assert bomb["status"] == "quarantined", bomb
        assert "MemoryError" in bomb["quarantine"]["reason"] or \
            "memory" in bomb["quarantine"]["reason"], bomb["quarantine"]

        # Every other rule's banners and e-mails are exact
        with_email = {r["key"] for r in BUILTIN_RULES if r["email"]}
        emails = sum(n for k, n in counts.items() if k in with_email)

        def banner_counts() -> Counter[str]:
            out: Counter[str] = Counter()
            for store in c.shards.stores:
                with store.engine.connect() as conn:
                    out.update(dict(conn.execute(select(banners.c.rule_key, func.count())
                                                 .group_by(banners.c.rule_key)).all()))
            return out

        wait_for(lambda: (banner_counts(), c.ledger.counts(), len(smtp_server.messages)),
                 f"banners {dict(counts)} and {emails} e-mails (banners, ledger, SMTP)",
                 until=lambda v: v[0] == counts and v[2] >= emails, timeout=60, every=0.3)
        time.sleep(1.0)
        assert banner_counts() == counts
        assert c.ledger.counts() == {"sent": emails}
        assert len(smtp_server.messages) == emails

        # The evaluator never went down: the same process, still running
        assert evaluator.poll() is None
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
        stop_all([evaluator])
        c.close()
