"""Rule code runs only in disposable child processes: the sandbox's second wall.

RestrictedPython and the guards (rules/sandbox.py, rules/guards.py) refuse what a
rule may not do; this module contains what they cannot: a native crash (CPython
segfaults hashing a deeply nested tuple), an allocation that outgrows the machine,
CPU spent inside one C call that no budget interrupt can reach. Every evaluation
of analyst code — the nightly and ingest evaluation, the test panel, examples on
save, preview, forecast, shadow, "why", template rendering — is a request to a
child process of a :class:`SandboxPool`:

* a child is a fresh interpreter (``python -m <module>``), not a fork: it inherits
  no connection, no open file beyond its pipes and no secret (its environment is
  reduced to :data:`SAFE_ENV`);
* it limits its own address space (``RLIMIT_AS``) before serving, and before each
  request its CPU time (``RLIMIT_CPU``: the kernel kills it past the limit); the
  parent also kills a child that does not answer within ``wall_s``;
* requests and answers are length-prefixed JSON frames on its stdin/stdout. The
  parent never unpickles anything a child sends: a child that ran hostile code is
  not trusted with more than data the caller validates.

A child that dies raises :class:`~base.errors.SandboxCrash` in the caller
(with the reason in words), is counted in ``kvadrupel_sandbox_deaths_total`` and
replaced; finding the rule responsible is the caller's job (engine/evaluate/worker.py
re-runs a crashed batch rule by rule). Children are kept warm between requests
(a spawn costs ~0.2 s): the pool holds up to ``size`` idle ones.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from base import metrics
from base.errors import RuleError, SandboxCrash

__all__ = ["SAFE_ENV", "Limits", "SandboxError", "SandboxPool", "serve"]

_HDR = struct.Struct(">II")  # meta length, body length
MAX_FRAME = 1 << 30
SAFE_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONPATH", "PYTHONHASHSEED",
            "PYTHONDONTWRITEBYTECODE", "SYSTEMROOT",
            "KVADRUPEL_BANNER_LINK_SCHEMES")  # read by the link check after rendering
OOM_EXIT = 3  # a child that ran out of memory outside a rule exits with this


class SandboxError(RuleError):
    """A request failed inside a live child (bad input, a compile error): the child
    said so and lives on."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What one child may use. ``memory_mb``: address space; ``cpu_s``: CPU seconds
    per request (the default; a request may ask for more); ``wall_s``: seconds the
    parent waits for an answer beyond the request's CPU allowance."""

    memory_mb: int = 1024
    cpu_s: float = 30.0
    wall_s: float = 30.0


def _reason(returncode: int | None, limits: Limits, killed: str | None) -> str:
    if killed:
        return killed
    if returncode is None:
        return "stopped answering"
    if returncode == OOM_EXIT:
        return f"ran out of memory (limit {limits.memory_mb} MB)"
    if returncode < 0:
        sig = -returncode
        if sig == signal.SIGXCPU:
            return "was killed at its CPU limit (SIGXCPU)"
        if sig == signal.SIGKILL:
            return "was killed (SIGKILL: CPU or memory limit, or the OOM killer)"
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"crashed ({name})"
    return f"exited with status {returncode}"


def _reason_label(reason: str) -> str:
    for word in ("SIGSEGV", "SIGBUS", "SIGABRT", "SIGXCPU", "SIGKILL", "memory", "answer"):
        if word in reason:
            return {"memory": "oom", "answer": "timeout"}.get(word, word)
    return "other"


class _Child:
    """One child process and its pipes."""

    def __init__(self, module: str, limits: Limits) -> None:
        env = {k: v for k, v in os.environ.items() if k in SAFE_ENV}
        env["MALLOC_ARENA_MAX"] = "2"  # each thread's arena reserves address space
        # Large blocks straight from (and back to) the kernel: what a rule hoarded is
        # returned when it is dropped, not kept in the heap against the limit.
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
        self.limits = limits
        self.proc = subprocess.Popen(  # noqa: S603 - our interpreter, our module
            [sys.executable, "-m", module, orjson.dumps({"memory_mb": limits.memory_mb}).decode()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True,
            start_new_session=True,  # a Ctrl-C to the parent's group is the parent's
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._w = self.proc.stdin.fileno()
        self._r = self.proc.stdout.fileno()
        os.set_blocking(self._w, False)
        self.seen: set[str] = set()  # cache keys this child holds
        self.requests = 0

    def call(self, meta: dict[str, Any], body: bytes,
             wall_s: float) -> tuple[dict[str, Any], bytes]:
        m = orjson.dumps(meta)
        deadline = time.monotonic() + wall_s
        try:
            self._write(_HDR.pack(len(m), len(body)) + m + body, deadline)
            mlen, blen = _HDR.unpack(self._read(_HDR.size, deadline))
            if mlen > MAX_FRAME or blen > MAX_FRAME:
                raise SandboxCrash("sent a malformed answer")
            out = orjson.loads(self._read(mlen, deadline))
            data = self._read(blen, deadline) if blen else b""
        except TimeoutError:
            self.kill()
            raise SandboxCrash(f"did not answer within {wall_s:.0f} s and was killed") from None
        except (BrokenPipeError, ConnectionResetError, EOFError):
            raise SandboxCrash(_reason(self._wait(), self.limits, None)) from None
        except orjson.JSONDecodeError:
            self.kill()
            raise SandboxCrash("sent a malformed answer") from None
        if not isinstance(out, dict):
            self.kill()
            raise SandboxCrash("sent a malformed answer")
        self.requests += 1
        return out, data

    def _write(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            _, w, _ = select.select([], [self._w], [], left)
            if w:
                n = os.write(self._w, view[: 1 << 20])
                view = view[n:]

    def _read(self, n: int, deadline: float) -> bytes:
        parts: list[bytes] = []
        while n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            r, _, _ = select.select([self._r], [], [], left)
            if not r:
                continue
            chunk = os.read(self._r, min(n, 1 << 22))
            if not chunk:
                raise EOFError
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)

    def _wait(self) -> int | None:
        try:
            return self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self.close()

    def close(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if f is not None:  # never: the pipes are made with the process
                    f.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


class SandboxPool:
    """Warm child processes serving requests of ``module`` (its ``main()`` calls
    :func:`serve`). Thread-safe; a request takes an idle child or starts one."""

    def __init__(self, module: str, limits: Limits | None = None, size: int = 2) -> None:
        self.module = module
        self.limits = limits or Limits()
        self.size = max(1, size)
        self._idle: list[_Child] = []
        self._lock = threading.Lock()
        self._closed = False
        self.deaths = 0
        self.spawned = 0

    def warm(self, n: int | None = None) -> None:
        """Start children now (a request then finds one ready)."""
        kids = [self._spawn() for _ in range(min(self.size, n or self.size))]
        with self._lock:
            self._idle.extend(kids)

    def _spawn(self) -> _Child:
        self.spawned += 1
        return _Child(self.module, self.limits)

    def call(self, op: str, meta: dict[str, Any] | None = None, body: bytes = b"", *,
             cpu_s: float | None = None, cache: tuple[str, Callable[[], Any]] | None = None,
             ) -> tuple[dict[str, Any], bytes]:
        """Run ``op`` in a child. ``cache``: (key, payload maker): the payload is sent
        along only to a child that has not got it yet (compiled rule packs).
        Raises :class:`SandboxCrash` when the child dies, :class:`SandboxError` when
        the request fails inside it."""
        if self._closed:
            raise SandboxError("the rule sandbox is shut down")
        cpu = float(cpu_s or self.limits.cpu_s)
        req: dict[str, Any] = {"op": op, "cpu_s": cpu, **(meta or {})}
        with self._lock:
            child = self._idle.pop() if self._idle else None
        if child is None or not child.alive:
            if child is not None:
                child.close()
            child = self._spawn()
        if cache is not None and cache[0] not in child.seen:
            req["cache"] = {cache[0]: cache[1]()}
        try:
            out, data = child.call(req, body, wall_s=cpu + self.limits.wall_s)
        except SandboxCrash as crash:
            child.kill()
            self.deaths += 1
            metrics.SANDBOX_DEATHS.labels(_reason_label(crash.reason)).inc()
            raise
        metrics.SANDBOX_CALLS.labels(op).inc()
        if cache is not None:
            child.seen.add(cache[0])
        with self._lock:
            if not self._closed and len(self._idle) < self.size and not out.get("retire"):
                self._idle.append(child)
                child = None
        if child is not None:
            child.close()  # a retiring child exits once its stdin closes
        if not out.get("ok"):
            raise SandboxError(str(out.get("error") or "the request failed"))
        return out, data

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()


# -- the child side -----------------------------------------------------------------
Handler = Callable[[dict[str, Any], bytes, dict[str, Any]], tuple[dict[str, Any], bytes]]


def _read_exact(fd: int, n: int) -> bytes:
    parts = []
    while n:
        chunk = os.read(fd, min(n, 1 << 22))
        if not chunk:
            raise EOFError
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _cpu_used() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def serve(handlers: dict[str, Handler]) -> None:
    """The child's loop: limit memory, then answer requests until stdin closes.

    ``handlers[op](meta, body, cache) -> (meta, body)``; ``cache`` holds what the
    parent sent along under a key (see :meth:`SandboxPool.call`)."""
    opts = orjson.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    out_fd = os.dup(1)
    os.dup2(2, 1)  # anything printed goes to stderr, never into the protocol
    limit = int(opts.get("memory_mb") or 0) << 20
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
    cache: dict[str, Any] = {}
    try:
        while _serve_one(handlers, cache, out_fd, cpu_hard, limit):
            pass
    except MemoryError:
        os._exit(OOM_EXIT)


def _rss() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _serve_one(handlers: dict[str, Handler], cache: dict[str, Any], out_fd: int,
               cpu_hard: int, limit: int) -> bool:
    """Answer one request; False when stdin closed or the child retires."""
    try:
        mlen, blen = _HDR.unpack(_read_exact(0, _HDR.size))
        meta = orjson.loads(_read_exact(0, mlen))
        body = _read_exact(0, blen) if blen else b""
    except EOFError:
        return False
    if "cache" in meta:
        cache.update(meta.pop("cache"))
        while len(cache) > 16:
            cache.pop(next(iter(cache)))
    soft = math.ceil(_cpu_used() + float(meta.get("cpu_s") or 30.0)) + 1
    if cpu_hard != resource.RLIM_INFINITY:
        soft = min(soft, cpu_hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, cpu_hard))
    try:
        handler = handlers[meta["op"]]
        out, data = handler(meta, body, cache)
        out["ok"] = True
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported to the parent, the child lives on
        out, data = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}, b""
    del body
    # A rule that hoarded memory leaves the heap fragmented: a child past half its
    # limit answers, then retires (the pool starts a fresh one; no death counted).
    retire = bool(limit) and _rss() > limit // 2
    if retire:
        out["retire"] = True
    m = orjson.dumps(out)
    os.write(out_fd, _HDR.pack(len(m), len(data)))
    _write_all(out_fd, m)
    _write_all(out_fd, data)
    return not retire


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
