"""Load test of the banner API: the realistic mix against a bare ASGI endpoint.

    flock /tmp/kvadrupel-bench.lock .venv/bin/python bench/bench_api.py \
        [--users 100000] [--servers granian uvicorn] [--workers 2] [--connections 64] \
        [--seconds 15] [--warmup 10] [--no-cache]

Creates 2 fresh PostgreSQL shard databases (+ control) on the local server, seeds
``--users`` users (0-3 banners each, known banner-set versions), then for each server
(granian, uvicorn; same settings: ``--workers`` processes, uvloop, no access log)
serves the real app — plus, in the same server process, a plain FastAPI route
``GET /bench/trivial`` and, outermost, a bare ASGI callable answering every
``/bench/bare/...`` path with a constant small JSON (no framework at all: the honest
ceiling of the server) — and drives them with wrk (Debian package ``wrk``) on
loopback, ``--connections`` connections, 2 threads:

* mix: 90 % revalidations (``If-None-Match`` with the user's current ETag → 304) and
  10 % full fetches (no ``If-None-Match`` → 200 with the body), users uniformly at
  random, portal service token;
* bare: the same wrk script (same random users, same headers) with its paths under
  ``/bench/bare``: what the server itself costs per request;
* trivial: the constant-JSON FastAPI endpoint, same server process, same settings.

Prints requests/s, p50 and p99 latency of each and the ratios mix / bare (the
issue's yardstick: 0.8x) and mix / trivial. The
caches are warmed first (``--warmup`` seconds of full fetches sweeping all users);
``--no-cache`` turns the version and body caches off (every request reads the
database) for comparison.
Not a test; figures depend on the machine and on what else runs on it (wrk shares
the 2 cores with the server and PostgreSQL). The databases are dropped at the end.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PG = os.environ.get("KVADRUPEL_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")
TOKEN = "bench-portal-" + "x" * 20
BASE_UID = 1_000_000


def version_of(uid: int) -> int:
    return uid % 5 + 1


def trivial_app():  # noqa: ANN201 - the server's app factory (bench only)
    """The real app plus ``/bench/trivial``: a plain FastAPI endpoint, constant small JSON."""
    from kvadrupel.serve import app_from_env

    app = app_from_env()

    @app.get("/bench/trivial")
    async def trivial() -> dict[str, str]:
        return {"status": "ok"}

    return with_bare(app)


BARE_BODY = b'{"status":"ok"}'
BARE_START = {"type": "http.response.start", "status": 200,
              "headers": [(b"content-type", b"application/json"),
                          (b"content-length", str(len(BARE_BODY)).encode())]}
BARE_END = {"type": "http.response.body", "body": BARE_BODY}


def with_bare(app):  # noqa: ANN001, ANN201 - ASGI (bench only)
    """``app`` behind a bare ASGI callable that answers ``/bench/bare/...`` itself."""

    async def bare(scope, receive, send):  # noqa: ANN001, ANN202
        if scope["type"] == "http" and scope["path"].startswith("/bench/bare/"):
            await send(BARE_START)
            await send(BARE_END)
            return
        await app(scope, receive, send)

    return bare


# -- databases --------------------------------------------------------------------------
def _admin():  # noqa: ANN202
    import psycopg

    return psycopg.connect(PG.replace("postgresql+psycopg://", "postgresql://") + "/postgres",
                           autocommit=True)


def create_dbs(tag: str) -> tuple[str, list[str]]:
    with _admin() as conn:
        for name in (f"kvb_{tag}_control", f"kvb_{tag}_s0", f"kvb_{tag}_s1"):
            conn.execute(f'CREATE DATABASE "{name}"')
    return f"{PG}/kvb_{tag}_control", [f"{PG}/kvb_{tag}_s0", f"{PG}/kvb_{tag}_s1"]


def drop_dbs(tag: str) -> None:
    with _admin() as conn:
        for name in (f"kvb_{tag}_control", f"kvb_{tag}_s0", f"kvb_{tag}_s1"):
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def seed(control: str, shards: list[str], users: int) -> dict[str, int]:
    """Every user: a banner-set version ``version_of(uid)`` and ``uid % 4`` banners."""
    import psycopg

    from kvadrupel.container import Container
    from kvadrupel.settings import Settings

    c = Container(Settings(shards=shards, control_db=control))
    c.migrate()
    router = c.shards.router
    c.close()
    now = datetime.now(UTC).isoformat()
    per: list[tuple[io.StringIO, io.StringIO]] = [(io.StringIO(), io.StringIO()) for _ in shards]
    counts = {"users": users, "banners": 0}
    for uid in range(BASE_UID + 1, BASE_UID + users + 1):
        sets, rows = per[router.shard_of(uid)]
        sets.write(f"{uid}\t{version_of(uid)}\n")
        for k in range(uid % 4):
            rows.write(f"{uid}\trule-{k}\trule-{k}.1\t1\t1\tBanner {k} for you\t"
                       f"Something about your account needs attention ({k}).\t"
                       f"https://example.org/r/{k}\t{100 - k * 10}\t2026-11-24\t{now}\t\\N\n")
            counts["banners"] += 1
    for url, (sets, rows) in zip(shards, per, strict=True):
        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
            with conn.cursor() as cur:
                with cur.copy("COPY banner_sets (user_id, version) FROM STDIN") as cp:
                    cp.write(sets.getvalue())
                with cur.copy("COPY banners (user_id, rule_key, id, episode, version, title, "
                              "body, link, priority, as_of, created_at, dismissed_at) "
                              "FROM STDIN") as cp:
                    cp.write(rows.getvalue())
            conn.execute("ANALYZE")
    return counts


# -- server ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(server: str, workers: int, port: int, env: dict[str, str]) -> subprocess.Popen:
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from kvadrupel.serve import run; "
            f"run({server!r}, '127.0.0.1', {port}, {workers}, "
            "target='bench.bench_api:trivial_app')")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{server} exited: {proc.stderr.read().decode()[-2000:]}") from None
            time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError(f"{server} did not start")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- load ----------------------------------------------------------------------------------
MIX_LUA = """
local users, base, token, revalidate, prefix = %d, %d, "Bearer %s", %f, "%s"
setup = function(thread) thread:set("id", math.random(1, 1000000)) end
init = function(args) math.randomseed(id + os.time()) end
request = function()
  local uid = base + math.random(1, users)
  local h = {["Authorization"] = token}
  if math.random() < revalidate then
    h["If-None-Match"] = '"' .. uid .. '-' .. (uid %% 5 + 1) .. '"'
  end
  return wrk.format("GET", prefix .. "/v1/users/" .. uid .. "/banners", h)
end
"""

# Warm-up: every thread walks all users in order from its own start, full fetches,
# so each worker process's version and body caches get (nearly) every user.
SWEEP_LUA = """
local users, base, token = %d, %d, "Bearer %s"
local i = 0
setup = function(thread) thread:set("id", math.random(1, 1000000)) end
init = function(args) i = id %% users end
request = function()
  i = (i + 1) %% users
  local uid = base + 1 + i
  return wrk.format("GET", "/v1/users/" .. uid .. "/banners", {["Authorization"] = token})
end
"""


def wrk(url: str, seconds: int, connections: int, script: str | None = None) -> dict[str, float]:
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "5s"]
    tmp = None
    if script:
        tmp = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
        tmp.write(script)
        tmp.close()
        cmd += ["-s", tmp.name]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    if tmp:
        os.unlink(tmp.name)
    return parse_wrk(out)


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def parse_wrk(out: str) -> dict[str, float]:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {p: _ms(v, u) for p, v, u in re.findall(r"\s(50|99)%\s+([\d.]+)(us|ms|s)\b", out)}
    errors = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    return {"rps": rps, "p50": lat["50"], "p99": lat["99"], "requests": total,
            "bad": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": errors.group(1) if errors else ""}  # type: ignore[dict-item]


def check_mix(port: int, users: int) -> dict[int, int]:
    """A few requests of each kind, checked: the mix really is 304s and 200s."""
    import random

    seen: dict[int, int] = {}
    for _ in range(200):
        uid = BASE_UID + random.randint(1, users)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        if random.random() < 0.9:
            headers["If-None-Match"] = f'"{uid}-{version_of(uid)}"'
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/users/{uid}/banners",
                                     headers=headers)
        try:
            with urllib.request.urlopen(req) as r:
                status = r.status
                assert len(__import__("json").loads(r.read())["banners"]) == uid % 4
        except urllib.error.HTTPError as e:
            status = e.code
        seen[status] = seen.get(status, 0) + 1
    return seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--servers", nargs="+", default=["granian", "uvicorn"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--revalidate", type=float, default=0.9)
    ap.add_argument("--no-cache", action="store_true")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 2
    tag = uuid.uuid4().hex[:8]
    control, shards = create_dbs(tag)
    try:
        t0 = time.perf_counter()
        counts = seed(control, shards, args.users)
        print(f"seeded {counts['users']:,} users, {counts['banners']:,} banners on 2 shards "
              f"in {time.perf_counter() - t0:.1f}s", flush=True)
        env = dict(os.environ, KVADRUPEL_SHARDS=",".join(shards), KVADRUPEL_CONTROL_DB=control,
                   KVADRUPEL_PORTAL_TOKEN=TOKEN, KVADRUPEL_LOG_LEVEL="WARNING",
                   PYTHONPATH=str(ROOT))
        if args.no_cache:
            env |= {"KVADRUPEL_BANNER_CACHE_USERS": "0", "KVADRUPEL_BANNER_CACHE_BODIES": "0"}
        mix_lua = MIX_LUA % (args.users, BASE_UID, TOKEN, args.revalidate, "")
        bare_lua = MIX_LUA % (args.users, BASE_UID, TOKEN, args.revalidate, "/bench/bare")
        rows = []
        for server in args.servers:
            port = free_port()
            proc = start_server(server, args.workers, port, env)
            try:
                base = f"http://127.0.0.1:{port}"
                print(f"{server}: mix check {check_mix(port, args.users)}", flush=True)
                if args.warmup:
                    w = wrk(base + "/", args.warmup, args.connections,
                            SWEEP_LUA % (args.users, BASE_UID, TOKEN))
                    print(f"{server}: warm-up {w['requests']:,} full fetches "
                          f"({w['rps']:,.0f}/s)", flush=True)
                mix = wrk(base + "/", args.seconds, args.connections, mix_lua)
                bare = wrk(base + "/", args.seconds, args.connections, bare_lua)
                triv = wrk(base + "/bench/trivial", args.seconds, args.connections)
            finally:
                stop_server(proc)
            rows.append((server, mix, bare, triv))
            print(f"{server}: mix {mix}, bare {bare}, trivial {triv}", flush=True)
    finally:
        drop_dbs(tag)
    cache = "caches OFF" if args.no_cache else "caches on"
    print(f"\nbanner API load test: {args.users:,} users on 2 PostgreSQL shards, "
          f"{args.connections} connections, {args.workers} workers, {args.seconds}s each, "
          f"{int(args.revalidate * 100)}% revalidations, {cache}")
    print(f"{'server':<8} {'endpoint':<22} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for server, mix, bare, triv in rows:
        for name, r in (("banners mix", mix), ("bare ASGI JSON", bare),
                        ("trivial FastAPI JSON", triv)):
            print(f"{server:<8} {name:<22} {r['rps']:>9,.0f} {r['p50']:>8.2f} {r['p99']:>8.2f} "
                  f"{r['bad']:>7}")
        print(f"{server:<8} ratio mix / bare ASGI: {mix['rps'] / bare['rps']:.2f} (goal 0.8), "
              f"mix / trivial FastAPI: {mix['rps'] / triv['rps']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
