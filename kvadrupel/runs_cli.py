"""``kvadrupel run-nightly``, ``kvadrupel run status|list`` and ``kvadrupel campaign ...``.

    kvadrupel run-nightly [--as-of DATE] [--rules a,b] [--wait]
    kvadrupel run status RUN_ID [--follow] [--json]
    kvadrupel run list [--limit N]
    kvadrupel campaign add --at "2026-12-01 10:00" [--rules a,b] [--as-of DATE] [--name N]
    kvadrupel campaign list [--status S] | campaign cancel ID

``--follow`` (and ``--wait``) draw a live progress bar on a terminal (a line
every few seconds otherwise) until the run finishes; the exit status is 0 for
``done``, 1 for ``done_with_errors`` or ``failed``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date, datetime
from typing import IO, Any
from zoneinfo import ZoneInfo

__all__ = ["add_parsers", "dispatch", "render_progress"]

CMDS = ("run-nightly", "run", "campaign")


def _date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {value!r}") from None


def _datetime(value: str) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a date-time (YYYY-MM-DD HH:MM[:SS][+HH:MM]): {value!r}"
        ) from None


def _keys(value: str) -> list[str]:
    keys = [k.strip() for k in value.split(",") if k.strip()]
    if not keys:
        raise argparse.ArgumentTypeError("give at least one rule key")
    return keys


def add_parsers(sub: Any) -> None:
    r = sub.add_parser("run-nightly", help="start a nightly run now (the users whose "
                       "answers can have changed; --full: everyone, counting mismatches)")
    r.add_argument("--as-of", type=_date, default=None)
    r.add_argument("--full", action="store_true",
                   help="also re-evaluate every user and count what incremental nights missed")
    r.add_argument(
        "--rules", type=_keys, default=None, help="only these rules (comma-separated keys)"
    )
    r.add_argument("--wait", action="store_true", help="follow the run until it finishes")
    rs = sub.add_parser("run", help="runs")
    rs_sub = rs.add_subparsers(dest="run_cmd", required=True)
    st = rs_sub.add_parser("status", help="show a run's progress")
    st.add_argument("run_id", type=int)
    st.add_argument(
        "--follow", "-f", action="store_true", help="live progress bar until it finishes"
    )
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    ls = rs_sub.add_parser("list", help="recent runs")
    ls.add_argument("--limit", type=int, default=20)
    c = sub.add_parser("campaign", help="scheduled campaigns (fired by `kvadrupel scheduler`)")
    c_sub = c.add_subparsers(dest="campaign_cmd", required=True)
    add = c_sub.add_parser("add", help="schedule a run of some rules at a time")
    add.add_argument("--at", type=_datetime, required=True,
                     help="ISO date-time; without an offset: in KVADRUPEL_TIMEZONE")
    add.add_argument(
        "--rules", type=_keys, default=None, help="comma-separated keys (default: all)"
    )
    add.add_argument("--as-of", type=_date, default=None)
    add.add_argument("--name", default=None)
    cl = c_sub.add_parser("list", help="campaigns, latest first")
    cl.add_argument("--status", default=None)
    cc = c_sub.add_parser("cancel", help="cancel a scheduled campaign")
    cc.add_argument("campaign_id", type=int)


def dispatch(args: argparse.Namespace, container: Any, out: IO[str] = sys.stdout) -> int:
    settings = container.settings
    if args.cmd == "run-nightly":
        from scheduler.planner import start_run

        as_of = args.as_of or container.clock.today()
        incremental = settings.incremental and args.rules is None
        run_id = start_run(container.shards, container.runs, container.bus, as_of,
                           settings.range_target_users, rules=args.rules,
                           active=container.rules.active_versions() if incremental else None,
                           full=args.full, verify_every_days=settings.verify_every_days)
        print(f"run {run_id} started as of {as_of}", file=out, flush=True)
        return follow(container.runs, run_id, out) if args.wait else 0
    if args.cmd == "run":
        if args.run_cmd == "list":
            for info in container.runs.list(args.limit):
                print(_one_line(info), file=out)
            return 0
        if args.follow:
            return follow(container.runs, args.run_id, out, as_json=args.json)
        info = container.runs.get(args.run_id)
        print(json.dumps(info, indent=2) if args.json else _summary(info), file=out)
        return 0
    from scheduler.campaigns import CampaignService

    campaigns = CampaignService(container.control, container.clock)
    if args.campaign_cmd == "add":
        at = args.at if args.at.tzinfo else args.at.replace(tzinfo=ZoneInfo(settings.timezone))
        print(
            json.dumps(
                campaigns.create(at, args.rules, as_of=args.as_of, name=args.name), indent=2
            ),
            file=out,
        )
    elif args.campaign_cmd == "list":
        for c in campaigns.list(args.status):
            print(
                f"{c['id']:>6}  {c['status']:<10} {c['at']}  run {c['run_id'] or '-':<6} "
                f"{c['name']}",
                file=out,
            )
    else:
        print(json.dumps(campaigns.cancel(args.campaign_id), indent=2), file=out)
    return 0


# -- progress -------------------------------------------------------------------

def _fraction(info: dict[str, Any]) -> float:
    if info["status"] != "running":
        return 1.0
    r = info["ranges"]
    if info["users_est"]:
        evaluated: float = info["users"] / info["users_est"]
        return min(0.999, evaluated)
    return (r["done"] + r["parked"]) / r["total"] if r["total"] else 0.0


def render_progress(info: dict[str, Any], width: int = 28) -> str:
    """One line: bar, percentage, ranges, users, users/s, ETA."""
    frac = _fraction(info)
    filled = int(frac * width)
    bar = "█" * filled + "░" * (width - filled)
    r = info["ranges"]
    extra = f", {r['running']} running" if r["running"] else ""
    extra += f", {r['parked']} parked" if r["parked"] else ""
    eta = info["eta_s"]
    eta_text = "-" if eta is None else (f"{eta:.0f}s" if eta < 600 else f"{eta / 60:.0f}m")
    users = (f"users {info['users']:,}" if info.get("mode", "full") == "full" else
             f"due {info['users']:,} skipped {info['skipped']:,}"
             + (f" swept {info['swept']:,}" if info.get("swept") else "")
             + (f" MISMATCHES {info['mismatches']:,}" if info.get("mismatches") else ""))
    return (f"run {info['id']} [{bar}] {frac * 100:5.1f}%  ranges {r['done']}/{r['total']}{extra}  "
            f"{users}  {info['users_per_s']:,.0f}/s  ETA {eta_text}")


def follow(runs: Any, run_id: int, out: IO[str] = sys.stdout, *, as_json: bool = False,
           interval: float = 0.5, quiet_every: float = 5.0) -> int:
    """Redraw the progress line until the run finishes; print the summary; the exit status."""
    tty = out.isatty()
    last_line = 0.0
    width = 0
    while True:
        info = runs.get(run_id)
        line = render_progress(info)
        if tty:
            print("\r" + line.ljust(width), end="", file=out, flush=True)
            width = len(line)
        elif time.monotonic() - last_line >= quiet_every or info["status"] != "running":
            print(line, file=out, flush=True)
            last_line = time.monotonic()
        if info["status"] != "running":
            break
        time.sleep(interval)
    if tty:
        print(file=out)
    print(json.dumps(info, indent=2) if as_json else _summary(info), file=out, flush=True)
    return 0 if info["status"] == "done" else 1


def _one_line(info: dict[str, Any]) -> str:
    r = info["ranges"]
    return (
        f"{info['id']:>6}  {info['status']:<16} {info['kind']:<8} as of {info['as_of']}  "
        f"{r['done']}/{r['total']} ranges  {info['users']:,} users  {info['users_per_s']:,.0f}/s"
    )


def _summary(info: dict[str, Any]) -> str:
    r = info["ranges"]
    lines = [
        f"run {info['id']} ({info['kind']}, as of {info['as_of']}): {info['status']}",
        f"  ranges   {r['done']} done, {r['running']} running, {r['parked']} parked of "
        f"{r['total']}",
        f"  users    {info['users']:,} (estimated {info['users_est']:,}), "
        f"{info['users_per_s']:,.0f}/s"
        + (
            f", ETA {info['eta_s']:.0f}s"
            if info["status"] == "running" and info["eta_s"] is not None
            else ""
        ),
        f"  changes  {info['enters']:,} enters, {info['exits']:,} exits",
    ]
    if info.get("mode", "full") != "full":
        lines.insert(3, f"  mode     {info['mode']}: {info['users']:,} due and evaluated, "
                        f"{info['skipped']:,} skipped (answers cannot have changed)"
                        + (f", {info['swept']:,} swept for {', '.join(info['sweep'] or [])}"
                           if info.get("swept") else "")
                        + (f"; verifying pass: {info['mismatches']:,} mismatches"
                           if info["mode"] == "verify" else ""))
    if info["rules"]:
        lines.append("  rules    " + ", ".join(info["rules"]))
    if info["matches"]:
        lines.append("  matches per rule:")
        lines += [
            f"    {k:<34} {n:>10,}"
            for k, n in sorted(info["matches"].items(), key=lambda kv: -kv[1])
        ]
    if info["errors"]:
        lines.append("  errors per rule:")
        lines += [
            f"    {k:<34} {n:>10,}"
            for k, n in sorted(info["errors"].items(), key=lambda kv: -kv[1])
        ]
    for w, v in info["workers"].items():
        lines.append(f"  worker {w}: {v['ranges']} ranges, {v['users']:,} users, "
                     f"{v['users_per_s'] or 0:,.0f} users/s")
    for p in info["parked"]:
        lines.append(f"  parked range {p['range']} (shard {p['shard']}): {p['error']}")
    return "\n".join(lines)
