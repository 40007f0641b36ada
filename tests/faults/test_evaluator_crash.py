"""A real `kvadrupel evaluate` process killed (SIGKILL) mid-range, on PostgreSQL + Kafka.

Given two evaluator processes in one consumer group and a delivery worker, when
one of them is killed while it is inside a range (some of the range's results
already published, its state not yet saved), then after the group rebalances
the other one redoes that range and the run completes with every user evaluated
exactly once in its final state, the same banners, and no duplicate e-mail.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from channels.mailers.outbox import read_outbox
from engine.evaluate.evaluation import CompiledPack
from kvadrupel.container import Container
from kvadrupel.demo import install_pack
from kvadrupel.settings import Settings
from rules.context import make_context
from rules.models import RuleIn
from rules.pack import BUILTIN_RULES
from scheduler.planner import start_run
from shards.schema import banners, run_ranges, user_state
from tests.fixtures.procs import stop_all
from tests.fixtures.waiting import scaled, wait_for
from tests.scheduler.helpers import AS_OF, TOKENS, load_users

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
N = 6_000

# Burns a few ms per profile so that a range lasts long enough to be killed inside.
SLOW = RuleIn(key="slow-check", name="slow", examples=[], source="""
def match(profile, ctx):
    n = 0
    for i in range(10000):
        n = n + i
    return n < 0
""")


def env_of(s: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "KVADRUPEL_SHARDS": ",".join(s.shards),
        "KVADRUPEL_CONTROL_DB": s.control_db,
        "KVADRUPEL_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
        "KVADRUPEL_KAFKA_TOPIC_PREFIX": s.kafka_topic_prefix,
        "KVADRUPEL_KAFKA_PARTITIONS": str(s.kafka_partitions),
        "KVADRUPEL_KAFKA_SESSION_TIMEOUT_MS": "2000",
        "KVADRUPEL_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
        "KVADRUPEL_KAFKA_FETCH_WAIT_MAX_MS": "20",
        "KVADRUPEL_DATA_DIR": str(s.data_dir),
        "KVADRUPEL_LOG_LEVEL": "WARNING",
    }


def test_killed_worker_range_is_redone_exactly_once(
    pg_factory, kafka_broker, tmp_path: Path
) -> None:  # noqa: ANN001
    dbs = pg_factory(2)
    s = Settings(
        data_dir=tmp_path / "data",
        shards=dbs.shards,
        control_db=dbs.control,
        kafka_bootstrap=kafka_broker.bootstrap,
        kafka_topic_prefix=f"t{uuid.uuid4().hex[:8]}",
        kafka_partitions=4,
        kafka_session_timeout_ms=2000,
        kafka_heartbeat_interval_ms=500,
        kafka_fetch_wait_max_ms=20,
        range_target_users=1_500,
        **TOKENS,
    )
    c = Container(s)
    c.migrate()
    install_pack(c.rules, BUILTIN_RULES)
    c.rules.create(SLOW)
    docs = load_users(c, N)
    stop = threading.Event()
    delivery = c.delivery_worker()
    threads = [delivery.start_thread(stop)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "kvadrupel.cli", "evaluate"], env=env_of(s), cwd=ROOT
        )
        for _ in range(2)
    ]
    try:
        time.sleep(4)  # both join the group (Tansu: ~session timeout / 2 each)
        run_id = start_run(c.shards, c.runs, c.bus, AS_OF, s.range_target_users)

        # When both workers are busy and one is inside a range (it reported
        # progress, so some of the range's results are out), that one is killed
        def ranges() -> list:
            with c.control.connect() as conn:
                return conn.execute(select(run_ranges).where(run_ranges.c.run_id == run_id)).all()

        def victim_of(rows: list) -> Any:  # a Row of run_ranges, or None
            if len({r.worker for r in rows if r.worker}) == 2:
                return next((r for r in rows if r.status == "running" and r.users > 0), None)
            return None

        rows = wait_for(ranges, f"both workers busy, one inside a range of run {run_id} (ranges)",
                        until=lambda rows: victim_of(rows) is not None, timeout=60)
        victim_range = victim_of(rows)
        victim_pid = int(victim_range.worker.rsplit(":", 1)[1])
        victim = next(p for p in procs if p.pid == victim_pid)
        os.kill(victim_pid, signal.SIGKILL)
        victim.wait(timeout=10)

        # Then the run completes: the other worker redid the range
        info = c.runs.wait(run_id, timeout=scaled(90))
        assert info["status"] == "done", info
        assert info["users"] == N and info["ranges"]["parked"] == 0
        with c.control.connect() as conn:
            redone = conn.execute(
                select(run_ranges).where(
                    (run_ranges.c.run_id == run_id)
                    & (run_ranges.c.range_no == victim_range.range_no)
                )
            ).one()
        assert redone.status == "done" and redone.attempts == 2
        assert redone.worker != victim_range.worker

        # Every user evaluated exactly once in its final state: reference matches,
        # and each match is episode 1 in the state
        pack = CompiledPack(c.rules.active(), 0)
        ctx = make_context(AS_OF, s.timezone)
        want = {
            uid: pack.resolve_groups(pack.ruleset.evaluate(doc, ctx).matched)
            for uid, doc in docs.items()
        }
        counts = Counter(k for ks in want.values() for k in ks)
        assert info["matches"] == dict(sorted(counts.items()))
        state: dict[int, dict] = {}
        for store in c.shards.stores:
            with store.engine.connect() as conn:
                state.update(conn.execute(select(user_state.c.user_id, user_state.c.matches)).all())
        # (every evaluated user has a state row, with its wake-up date: docs/scaling.md)
        assert set(state) == set(docs)
        assert {u: sorted(k for k, v in m.items() if v[1]) for u, m in state.items()} == \
            {u: sorted(ks) for u, ks in want.items()}
        assert all(v[0] == 1 for m in state.values() for v in m.values())

        # Same banners, no duplicate e-mail: wait for delivery to settle
        with_banner = Counter(
            k for ks in want.values() for k in ks
        )  # every builtin rule has a banner
        with_email = {r["key"] for r in BUILTIN_RULES if r["email"]}
        emails_expected = sum(n for k, n in counts.items() if k in with_email)

        def banner_counts() -> Counter[str]:
            out: Counter[str] = Counter()
            for store in c.shards.stores:
                with store.engine.connect() as conn:
                    out.update(dict(conn.execute(select(banners.c.rule_key, func.count())
                                                 .group_by(banners.c.rule_key)).all()))
            return out

        wait_for(lambda: (banner_counts(), c.ledger.counts()),
                 f"banners {dict(with_banner)} and {emails_expected} e-mails sent "
                 "(banners by rule, ledger by status)",
                 until=lambda v: v[0] == with_banner and v[1].get("sent", 0) >= emails_expected,
                 timeout=60, every=0.2)
        time.sleep(1.0)  # anything still in flight would show now
        assert banner_counts() == with_banner
        assert c.ledger.counts() == {"sent": emails_expected}
        mails = read_outbox(s.data_dir / "outbox")
        ids = [m["Message-ID"] for m in mails]
        assert len(mails) == emails_expected and len(set(ids)) == len(ids)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
        stop_all(procs)
        c.close()
