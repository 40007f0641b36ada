"""The ``kvadrupel`` command: one entry point for every process.

    kvadrupel demo [--users N] [--host H] [--port P] [--no-serve]
    kvadrupel migrate
    kvadrupel api | ingest | evaluate | deliver | scheduler
    kvadrupel run-nightly [--as-of DATE] [--wait]
    kvadrupel run status RUN_ID
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from datetime import date

from kvadrupel.errors import ConfigError, KvadrupelError

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
    sub.add_parser("migrate", help="bring the control DB and every shard to the latest schema")
    a = sub.add_parser("api", help="serve the REST API")
    a.add_argument("--host", default="127.0.0.1")
    a.add_argument("--port", type=int, default=8000)
    a.add_argument("--workers", type=int, default=1)
    for name, text in (("ingest", "consume profile events"), ("evaluate", "evaluate range and user jobs"),
                       ("deliver", "store banners and send e-mails"),
                       ("scheduler", "publish the nightly run on its cron")):
        sub.add_parser(name, help=text)
    r = sub.add_parser("run-nightly", help="start a run over every user now")
    r.add_argument("--as-of", type=_date, default=None)
    r.add_argument("--wait", action="store_true", help="wait for the run to finish")
    rs = sub.add_parser("run", help="runs")
    rs_sub = rs.add_subparsers(dest="run_cmd", required=True)
    st = rs_sub.add_parser("status", help="show a run's progress")
    st.add_argument("run_id", type=int)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from kvadrupel import logs
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


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def _dispatch(args: argparse.Namespace, settings) -> int:  # noqa: ANN001
    from kvadrupel.container import Container

    if args.cmd == "demo":
        from kvadrupel.demo import run_demo

        return run_demo(settings, users=args.users, host=args.host, port=args.port,
                        serve=not args.no_serve, as_of=args.as_of)
    container = Container(settings)
    try:
        if args.cmd == "migrate":
            container.migrate()
            print(f"migrated control DB and {len(settings.shard_urls())} shard(s)")
            return 0
        if args.cmd == "api":
            import uvicorn

            from api.app import create_app

            uvicorn.run(create_app(container), host=args.host, port=args.port,
                        log_config=None, access_log=False)
            return 0
        if args.cmd in ("ingest", "evaluate", "deliver"):
            stop = _stop_on_signals()
            worker = {"ingest": container.ingest_worker, "evaluate": container.evaluator_worker,
                      "deliver": container.delivery_worker}[args.cmd]()
            log.info("%s worker started", args.cmd)
            worker.run(stop)
            log.info("%s worker stopped", args.cmd)
            return 0
        if args.cmd == "scheduler":
            from scheduler.service import run_scheduler

            return run_scheduler(container, _stop_on_signals())
        if args.cmd == "run-nightly":
            from scheduler.planner import start_run
            from scheduler.service import today_in

            as_of = args.as_of or today_in(settings.timezone)
            run_id = start_run(container.shards, container.runs, container.bus, as_of,
                               settings.range_target_users)
            print(f"run {run_id} started as of {as_of}")
            if args.wait:
                info = container.runs.wait(run_id, timeout=24 * 3600)
                print(info)
            return 0
        if args.cmd == "run":
            import json

            print(json.dumps(container.runs.get(args.run_id), indent=2))
            return 0
    finally:
        container.close()
    return 1


if __name__ == "__main__":
    sys.exit(main())
