"""Encode + decode of the bus messages (engine/messages.py): msgspec Structs against
pydantic models of the same fields, and orjson of plain dicts (no validation), per
message kind, in one run.

    .venv/bin/python bench/bench_messages.py [--n 200000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from engine import messages as m  # noqa: E402


class PRangeJob(BaseModel):
    v: int = 0
    type: Literal["range"] = "range"
    run_id: int
    range_no: int
    shard: int
    lo: int
    hi: int
    as_of: str
    rules: list[str] | None = None


class PUsersJob(BaseModel):
    v: int = 0
    type: Literal["users"] = "users"
    shard: int
    user_ids: list[int]
    as_of: str | None = None


class PEnter(BaseModel):
    v: int = 0
    kind: Literal["enter"] = "enter"
    user_id: int
    rule: str
    episode: int
    version: int
    as_of: str
    priority: int = 0
    run_id: int | None = None
    banner: dict[str, Any] | None = None
    email: dict[str, Any] | None = None
    push: dict[str, Any] | None = None
    lang: str | None = None
    user_lang: str | None = None
    tz: str | None = None
    why: Any = None


class PExit(BaseModel):
    v: int = 0
    kind: Literal["exit"] = "exit"
    user_id: int
    rule: str
    episode: int
    version: int
    as_of: str
    priority: int = 0
    run_id: int | None = None


SAMPLES: dict[str, tuple[Any, type[BaseModel], Any]] = {
    "range job": (m.RangeJob(v=1, run_id=7, range_no=3, shard=1, lo=1, hi=2**40,
                             as_of="2026-11-24", rules=None), PRangeJob, m.decode_job),
    "users job": (m.UsersJob(v=1, shard=0, user_ids=list(range(1000, 1200))), PUsersJob,
                  m.decode_job),
    "result enter": (m.Enter(v=1, user_id=1000123, rule="dl-expiring", episode=2, version=3,
                             as_of="2026-11-24", priority=110, run_id=7,
                             banner={"title": "Your licence expires soon",
                                     "body": "Renew it on the portal", "link": "/dl/renew",
                                     "category": "documents"},
                             email={"subject": "Licence", "text": "Dear Ann, ..." * 5,
                                    "html": "<p>Dear Ann</p>" * 5, "to": "ann@example.org"},
                             lang="en", user_lang="en", tz="Europe/Moscow",
                             why={"fields": {"driver_license.expires_on": "2026-12-20"},
                                  "missing": [], "matched": True}), PEnter, m.decode_result),
    "result exit": (m.Exit(v=1, user_id=1000123, rule="dl-expiring", episode=2, version=3,
                           as_of="2026-11-24", priority=110, run_id=7), PExit, m.decode_result),
}


def per_op(fn: Any, n: int) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    n = ap.parse_args().n
    print(f"{'message':<14}{'bytes':>7}{'msgspec us':>12}{'pydantic us':>13}{'orjson dict':>13}"
          f"{'pydantic/msgspec':>18}")
    for name, (msg, model, decode) in SAMPLES.items():
        data = m.encode(msg)
        as_dict = orjson.loads(data)
        ms = per_op(lambda data=data, decode=decode: m.encode(decode(data)), n)
        pd = per_op(lambda data=data, model=model:
                    model.model_validate_json(data).model_dump_json(), n)
        oj = per_op(lambda data=data: orjson.dumps(orjson.loads(data)), n)
        assert model.model_validate(as_dict).model_dump() == orjson.loads(m.encode(decode(data)))
        print(f"{name:<14}{len(data):>7}{ms:>12.2f}{pd:>13.2f}{oj:>13.2f}{pd / ms:>17.2f}x")
    print("(decode + encode of one message; orjson dict: no validation at all)")


if __name__ == "__main__":
    main()
