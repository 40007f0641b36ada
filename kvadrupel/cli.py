"""The ``kvadrupel`` command: one entry point for every process.

    kvadrupel demo [--users N] [--host H] [--port P] [--no-serve]
    kvadrupel embedded [--host H] [--port P]
    kvadrupel migrate
    kvadrupel api | ingest | evaluate | deliver | scheduler
    kvadrupel run-nightly [--as-of DATE] [--rules a,b] [--wait]
    kvadrupel run status RUN_ID [--follow] [--json] | run list
    kvadrupel campaign add --at TIME [--rules a,b] | campaign list | campaign cancel ID
    kvadrupel user add NAME --role ROLE | passwd | role | disable | enable | list
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from datetime import date
from typing import TYPE_CHECKING

from base.errors import ConfigError, KvadrupelError
from kvadrupel import rules_cli, runs_cli, users_cli

if TYPE_CHECKING:  # imported when needed: `kvadrupel --help` stays quick
    from kvadrupel.settings import Settings

log = logging.getLogger("kvadrupel")


def _date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {value!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvadrupel", description="Rule-based targeted notifications.")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run the whole pipeline embedded on synthetic users")
    d.add_argument("--users", type=int, default=10_000)
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=8000)
    d.add_argument("--no-serve", action="store_true", help="stop after the summary")
    d.add_argument("--as-of", type=_date, default=None)
    e = sub.add_parser("embedded", help="serve the API and run every worker in one process "
                                        "(embedded backends; unlike the demo, keeps its data)")
    e.add_argument("--host", default="127.0.0.1")
    e.add_argument("--port", type=int, default=8000)
    sub.add_parser("migrate", help="bring the control DB and every shard to the latest schema")
    a = sub.add_parser("api", help="serve the REST API")
    a.add_argument("--host", default="127.0.0.1")
    a.add_argument("--port", type=int, default=8000)
    a.add_argument("--workers", type=int, default=None, help="default: KVADRUPEL_API_WORKERS")
    a.add_argument("--server", choices=["granian", "uvicorn"], default=None,
                   help="default: KVADRUPEL_API_SERVER (docs/api.md)")
    for name, text in (
        ("ingest", "consume profile events"),
        ("evaluate", "evaluate range and user jobs"),
        ("deliver", "store banners and send e-mails"),
        ("scheduler", "fire the nightly run and scheduled campaigns"),
    ):
        sub.add_parser(name, help=text)
    runs_cli.add_parsers(sub)  # run-nightly, run status|list, campaign
    users_cli.add_parser(sub)
    rules_cli.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from base import logs
    from kvadrupel.settings import Settings

    try:
        settings = Settings()
    except ValueError as exc:
        print(f"kvadrupel: bad setting: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.log_level)
    try:
        return _dispatch(args, settings)
    except ConfigError as exc:
        print(f"kvadrupel: configuration error: {exc}", file=sys.stderr)
        return 2
    except KvadrupelError as exc:
        print(f"kvadrupel: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _stop_on_signals(grace_s: float = 30.0) -> threading.Event:
    """SIGTERM/SIGINT set the returned event: workers finish the batch in hand,
    commit it and leave their group. If that takes longer than ``grace_s`` the
    process exits anyway (uncommitted work is redelivered to the group)."""
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping (grace %.0fs)", signum, grace_s)
        stop.set()
        timer = threading.Timer(grace_s, lambda: os._exit(3))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    from kvadrupel.container import Container

    if args.cmd == "demo":
        from kvadrupel.demo import run_demo

        return run_demo(settings, users=args.users, host=args.host, port=args.port,
                        serve=not args.no_serve, as_of=args.as_of)
    if args.cmd == "embedded":
        from kvadrupel.demo import run_embedded

        return run_embedded(settings, host=args.host, port=args.port)
    container = Container(settings)
    try:
        if args.cmd == "user":
            return users_cli.run_user(args, container)
        if args.cmd == "rule":
            return rules_cli.run_rule(args, container)
        if args.cmd == "migrate":
            container.migrate()
            print(f"migrated control DB and {len(settings.shard_urls())} shard(s)")
            return 0
        if args.cmd in ("api", "ingest", "evaluate", "deliver", "scheduler"):
            from kvadrupel.preflight import check_reachable, check_settings

            check_settings(settings, args.cmd)
            check_reachable(container)
        if args.cmd == "api":
            from kvadrupel.serve import run  # each worker process builds its own container

            run(args.server or settings.api_server, args.host, args.port,
                args.workers or settings.api_workers)
            return 0
        if args.cmd in ("ingest", "evaluate", "deliver"):
            from kvadrupel.ops import serve_ops

            stop = _stop_on_signals(settings.shutdown_grace_s)
            worker = {"ingest": container.ingest_worker, "evaluate": container.evaluator_worker,
                      "deliver": container.delivery_worker}[args.cmd]()
            serve_ops(container, settings.ops_port)
            log.info("%s worker started", args.cmd)
            worker.run(stop)
            log.info("%s worker stopped", args.cmd)
            return 0
        if args.cmd == "scheduler":
            from scheduler.service import run_scheduler

            return run_scheduler(container, _stop_on_signals())
        if args.cmd in runs_cli.CMDS:
            return runs_cli.dispatch(args, container)
    finally:
        container.close()
    return 1


if __name__ == "__main__":
    sys.exit(main())
