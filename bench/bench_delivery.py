"""E-mails per second from the delivery worker to a local SMTP server, against the
bare aiosmtplib ceiling over the same number of connections, in the same run.

    flock /tmp/kvadrupel-bench.lock .venv/bin/python bench/bench_delivery.py \
        [--messages 3000] [--connections 8] [--rounds 3] [--embedded] [--banners]

A local aiosmtpd server runs in a child process (its own interpreter and core) and
only counts what it receives. In this process, per round:

* ``worker``: N rule results ("enter" with an e-mail) are on the results topic
  (the in-process bus); the timer runs from the first ``DeliveryWorker.step()``
  until the server has counted all N. That is everything the worker does per
  message: parse the result, record the episode (with its why-data) in the shard,
  read the user's preferences, claim the ledger row, apply the channel policy
  (frequency cap query included), build the message with its unsubscribe link and
  List-Unsubscribe header, send it over the pooled connections, record it as sent.
  Storage is PostgreSQL (fresh databases on 127.0.0.1:5432; ``--embedded``: SQLite
  files). ``--banners``: the results also carry a banner (one more shard write).
* ``bare``: no Kvadrupel code: the same N messages (as the worker would send them)
  built as stdlib ``EmailMessage`` objects and sent with aiosmtplib's
  ``send_message`` over the same number of connections, each draining one queue;
* ``careful``: no Kvadrupel code: the fast way a careful aiosmtplib user builds
  the same messages: the template's MIME skeleton fixed once, each message
  assembled as text from its fields and encoded (``bench_mail.CarefulBuilder``),
  then ``sendmail``;
* ``wire``: like bare, but flattened to bytes before the timer: the protocol alone,
  the ceiling for any client on these connections (the target: worker / wire at
  least 0.8).

Every path opens its connections inside the timed region. The median round is
reported with every ratio. ``--profile FILE`` writes a cProfile of the worker
rounds (``python -m pstats FILE``).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson  # noqa: E402

from bench.bench_mail import SmtpSink, flattened, run_bare, run_careful, run_wire  # noqa: E402
from channels.ledger import Claim  # noqa: E402
from channels.mail import Email  # noqa: E402

PG = "postgresql+psycopg://postgres@127.0.0.1:5432"
MAIL_FROM = "Kvadrupel <noreply@kvadrupel.test>"


def results(n: int, base: int, banners: bool) -> list[dict[str, Any]]:
    text = "Hello {name},\n\nyour driving licence expires on 2026-12-10. " + \
        "Renew it online before then.\n" * 4
    html = (
        "<html><body><h1>Hello {name}</h1>"
        + "<p>Your licence expires on <b>2026-12-10</b>.</p>" * 10
        + "</body></html>"
    )
    out = []
    for i in range(n):
        uid = base + i
        name = f"user {uid}"
        out.append({
            "kind": "enter", "user_id": uid, "rule": "dl-expiring", "episode": 1, "version": 3,
            "priority": 110, "as_of": "2026-11-24", "run_id": 1,
            "banner": ({"title": "Your licence expires soon", "body": "On 2026-12-10.",
                        "link": "https://x.test/dl", "category": "documents", "critical": False}
                       if banners else None),
            "email": {"subject": f"{name}, your licence expires on 2026-12-10",
                      "text": text.format(name=name), "html": html.format(name=name),
                      "category": "documents", "critical": False, "to": f"user{uid}@example.com"},
            "push": None, "lang": "en", "user_lang": "en", "tz": None,
            "why": {"fields": {"driver_license.expires_on": "2026-12-10"}, "missing": [],
                    "matched": True},
        })
    return out


class Storage:
    """Fresh control + 2 shard databases (PostgreSQL, or SQLite files)."""

    def __init__(self, embedded: bool) -> None:
        self.embedded = embedded
        self.tag = f"kvb_dlv_{uuid.uuid4().hex[:8]}"
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-delivery-"))
        self.names = [f"{self.tag}_control", f"{self.tag}_s0", f"{self.tag}_s1"]
        if not embedded:
            import psycopg

            with psycopg.connect(
                "postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True
            ) as c:
                for name in self.names:
                    c.execute(f'CREATE DATABASE "{name}"')

    def settings(self, smtp_url: str, connections: int) -> Any:
        from kvadrupel.settings import Settings

        kw: dict[str, Any] = {"data_dir": self.tmp / "data", "smtp_url": smtp_url,
                              "smtp_concurrency": connections, "admin_token": "bench-" + "x" * 20,
                              "log_level": "WARNING"}
        if not self.embedded:
            kw |= {"control_db": f"{PG}/{self.names[0]}",
                   "shards": [f"{PG}/{self.names[1]}", f"{PG}/{self.names[2]}"]}
        return Settings(**kw)

    def drop(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        if not self.embedded:
            import psycopg

            with psycopg.connect(
                "postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True
            ) as c:
                for name in self.names:
                    c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--embedded", action="store_true", help="SQLite storage instead of PostgreSQL"
    )
    parser.add_argument("--banners", action="store_true", help="results carry a banner too")
    parser.add_argument("--profile", metavar="FILE",
                        help="cProfile the worker rounds into FILE (pstats); slows them down")
    args = parser.parse_args()
    n, conns = args.messages, args.connections

    sink = SmtpSink().start()
    host, port, url = sink.host, sink.port, sink.url

    from kvadrupel.container import Container

    storage = Storage(args.embedded)
    container = Container(storage.settings(url, conns))
    runs: dict[str, list[tuple[float, float]]] = {
        "worker": [], "bare": [], "careful": [], "wire": []}
    try:
        container.migrate()
        worker = container.delivery_worker()
        profiler = None
        worker.poll_timeout = 0.001
        bus = container.bus
        topic = bus.topic("results")

        def worker_round(batch: list[dict[str, Any]]) -> tuple[float, float]:
            for r in batch:
                bus.publish(topic, orjson.dumps(r), key=str(r["user_id"]).encode())
            bus.flush()
            before = sink.received
            wall, cpu = time.perf_counter(), time.process_time()
            if profiler is not None:
                profiler.enable()
            while sink.received - before < len(batch):
                if worker.step() == 0 and time.perf_counter() - wall > 120:
                    raise SystemExit(f"worker: {sink.received - before} of {len(batch)} arrived")
            if profiler is not None:
                profiler.disable()
            return time.perf_counter() - wall, time.process_time() - cpu

        def same_emails(batch: list[dict[str, Any]]) -> list[Email]:
            built = [worker._email(Claim(r["user_id"], r["rule"], 1, "email", r["version"], 1,
                                         r["email"] | {"user_lang": "en"})) for r in batch]
            assert all(isinstance(e, Email) for e in built)
            return built  # type: ignore[return-value]

        def client_round(name: str, emails: list[Email]) -> tuple[float, float]:
            prepared = flattened(emails) if name == "wire" else None
            before = sink.received
            wall, cpu = time.perf_counter(), time.process_time()
            if name == "bare":
                ok = asyncio.run(run_bare(host, port, emails, conns))
            elif name == "careful":
                ok = asyncio.run(run_careful(host, port, emails, conns))
            else:
                ok = asyncio.run(run_wire(host, port, prepared, conns))
            out = time.perf_counter() - wall, time.process_time() - cpu
            time.sleep(0.05)
            if ok != len(emails) or sink.received - before != len(emails):
                raise SystemExit(f"{name}: {ok} ok, {sink.received - before} arrived")
            return out

        base = 10_000_000
        # Warm-up: imports, first connections, statement caches, the server's code paths.
        warm = results(300, base, args.banners)
        base += 300
        worker_round(warm)
        if args.profile:
            import cProfile

            profiler = cProfile.Profile()
        client_round("bare", same_emails(warm))
        client_round("careful", same_emails(warm))
        client_round("wire", same_emails(warm))
        for rnd in range(args.rounds):
            order = ["worker", "bare", "careful", "wire"]
            if rnd % 2:
                order.reverse()
            batch = results(n, base, args.banners)
            base += n
            for name in order:
                runs[name].append(worker_round(batch) if name == "worker"
                                  else client_round(name, same_emails(batch)))
        sent = container.ledger.counts().get("sent", 0)
        assert sent == 300 + n * args.rounds, f"ledger: {sent} sent"
        worker.close()
    finally:
        sink.close()
        container.close()
        storage.drop()

    if profiler is not None:
        profiler.dump_stats(args.profile)
    store = "SQLite" if args.embedded else "PostgreSQL"
    print(
        f"{n} e-mails per round, {conns} SMTP connections, {args.rounds} rounds (median), "
        f"{store} storage{', with banners' if args.banners else ''}, aiosmtpd in a child process, "
        f"Python {sys.version.split()[0]}"
    )
    rate = {}
    for name, rs in runs.items():
        wall = statistics.median(r[0] for r in rs)
        cpu = statistics.median(r[1] for r in rs)
        rate[name] = n / wall
        print(
            f"  {name:<7} {rate[name]:>8,.0f} e-mails/s   client CPU {cpu / n * 1e6:6.0f} us/e-mail"
            f"   (rounds: {', '.join(f'{n / r[0]:,.0f}' for r in rs)})"
        )
    print("  ratios: " + "   ".join(
        f"{a} / {b}: {rate[a] / rate[b]:.2f}"
        for a, b in (("worker", "wire"), ("worker", "careful"), ("worker", "bare"),
                     ("careful", "wire"), ("bare", "wire"))))


if __name__ == "__main__":
    main()
