"""Rule code on behalf of the API, the CLI and audience questions, run in the
sandbox's child processes (rules/isolation.py, engine/evaluate/child.py).

:class:`RuleRunner` is what callers use instead of a local :class:`RuleSet`:
``grid`` evaluates rule sets over documents × dates and returns match masks,
``render`` fills banner/e-mail templates, ``explain`` gives the "why". A child that
dies on the way raises :class:`~base.errors.SandboxCrash`; callers answer
with a clear error (HTTP 422), never with a dead process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import orjson

from rules.isolation import SandboxPool
from rules.ruleset import RuleSpec

__all__ = ["CHILD_MODULE", "Grid", "RuleRunner"]

CHILD_MODULE = "engine.evaluate.child"
CHUNK = 2000  # documents per request: a crash loses little, memory stays bounded


@dataclass(slots=True)
class Grid:
    """``masks[i][j]``: bit ``k`` set when ``specs[k]`` matched doc ``i`` at date ``j``;
    ``errors``: ``(i, j, key, message)``; ``timeouts``: ``(i, j, key)``."""

    masks: list[list[int]] = field(default_factory=list)
    errors: list[tuple[int, int, str, str]] = field(default_factory=list)
    timeouts: list[tuple[int, int, str]] = field(default_factory=list)

    def failure(self, i: int, j: int = 0) -> str | None:
        for e in self.errors:
            if e[0] == i and e[1] == j:
                return e[3]
        for t in self.timeouts:
            if t[0] == i and t[1] == j:
                return "timeout"
        return None


def _spec(s: RuleSpec) -> list[Any]:
    return [s.key, s.version, s.source, s.priority, s.group]


class RuleRunner:
    def __init__(self, pool: SandboxPool, budget_ms: float = 50.0) -> None:
        self.pool = pool
        self.budget_ms = budget_ms

    def _cpu(self, evaluations: int, rules: int) -> float:
        # The child's watchdog bounds each call by the budget; this is the backstop
        # for CPU spent where no interrupt reaches (one long C call).
        return min(120.0, max(10.0, evaluations * rules * self.budget_ms / 1000.0))

    def grid(self, specs: Sequence[RuleSpec], docs: Sequence[Any],
             dates: Sequence[date], tz: str, *, per_doc: bool = False) -> Grid:
        """Evaluate ``specs`` (one rule set) on every doc at every date; with
        ``per_doc``, ``dates[i]`` is doc ``i``'s only date."""
        out = Grid()
        sp = [_spec(s) for s in specs]
        for lo in range(0, len(docs), CHUNK):
            part = docs[lo:lo + CHUNK]
            ds = dates[lo:lo + CHUNK] if per_doc else dates
            meta = {"specs": sp, "budget_ms": self.budget_ms, "per_doc": per_doc,
                    "ctxs": [[d.isoformat(), tz] for d in ds]}
            n = len(part) * (1 if per_doc else len(ds))
            _, body = self.pool.call("grid", meta, orjson.dumps(part),
                                     cpu_s=self._cpu(n, len(sp)))
            got = orjson.loads(body)
            out.masks += [[int(m) for m in row] for row in got["m"]]
            out.errors += [(int(i) + lo, int(j), str(k), str(msg)[:2000])
                           for i, j, k, msg in got["e"]]
            out.timeouts += [(int(i) + lo, int(j), str(k)) for i, j, k in got["t"]]
        if len(out.masks) != len(docs):
            raise ValueError("the sandbox answered for the wrong number of documents")
        return out

    def match(self, spec: RuleSpec, doc: Any, as_of: date, tz: str) -> tuple[bool, str | None]:
        """One rule on one profile: (matched, error or "timeout" or None)."""
        g = self.grid([spec], [doc], [as_of], tz)
        return bool(g.masks[0][0] & 1), g.failure(0)

    def render(self, parts: dict[str, Any], profile: Any, as_of: date, tz: str
               ) -> dict[str, Any]:
        """``{part: rendered}`` (or ``{part + "_error": message}``) per content spec."""
        _, body = self.pool.call("render", {"parts": parts, "ctx": [as_of.isoformat(), tz]},
                                 orjson.dumps(profile), cpu_s=10.0)
        got = orjson.loads(body)
        if not isinstance(got, dict):
            raise ValueError("malformed answer from the sandbox")
        return got

    def explain(self, key: str, version: int, source: str, profile: Any, as_of: date,
                tz: str) -> Any:
        meta = {"key": key, "version": version, "source": source, "budget_ms": self.budget_ms,
                "ctx": [as_of.isoformat(), tz]}
        _, body = self.pool.call("explain", meta, orjson.dumps(profile), cpu_s=10.0)
        return orjson.loads(body)
