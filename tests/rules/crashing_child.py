"""A sandbox child for tests of rules/isolation.py: each op fails the way a hostile
rule could make a real child fail, without needing a rule to get there."""

from __future__ import annotations

import ctypes
import os
import time

import orjson

from rules.isolation import serve


def _segv(meta: dict, body: bytes, cache: dict) -> tuple[dict, bytes]:
    ctypes.string_at(0)  # a native crash: SIGSEGV
    return {}, b""


def _alloc(meta: dict, body: bytes, cache: dict) -> tuple[dict, bytes]:
    hoard = [bytearray(1 << 20) for _ in range(int(meta["mb"]))]
    return {"held": len(hoard)}, b""


def _spin(meta: dict, body: bytes, cache: dict) -> tuple[dict, bytes]:
    while True:
        pass


def _sleep(meta: dict, body: bytes, cache: dict) -> tuple[dict, bytes]:
    time.sleep(float(meta["s"]))
    return {}, b""


def _env(meta: dict, body: bytes, cache: dict) -> tuple[dict, bytes]:
    fds = sorted(int(f) for f in os.listdir("/proc/self/fd"))
    return {"env": sorted(os.environ), "fds": fds, "cache": sorted(cache)}, b""


def _echo(meta: dict, body: bytes, cache: dict) -> tuple[dict, bytes]:
    return {"pid": os.getpid()}, body


def _fail(meta: dict, body: bytes, cache: dict) -> tuple[dict, bytes]:
    raise ValueError("bad input")


def _garbage(meta: dict, body: bytes, cache: dict) -> tuple[dict, bytes]:
    os.write(1, b"\x00\x00\x00\x05\x00\x00\x00\x00{not json")  # stdout is stderr now
    os.write(3, b"\x00\x00\x00\x05\x00\x00\x00\x00notjs")  # the protocol fd (dup of 1)
    os._exit(0)


if __name__ == "__main__":
    serve({"segv": _segv, "alloc": _alloc, "spin": _spin, "sleep": _sleep, "env": _env,
           "echo": _echo, "fail": _fail, "garbage": _garbage})
    orjson.dumps(None)
