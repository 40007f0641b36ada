"""Bench only: an evaluator process that runs the rules in itself, as the engine
did before rule code moved to sandbox children (rules/isolation.py).

``bench_nightly.py --isolation-ab`` runs each measured night twice, once with
``kvadrupel evaluate`` and once with this, so the cost of isolation is measured in
one sitting on the same data and topology. Never use this in a deployment: a
crashing rule takes this process down.
"""

from __future__ import annotations

import sys
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.evaluate.evaluation import CompiledPack, RangeStats, evaluate_rows  # noqa: E402
from engine.evaluate.worker import EvaluatorWorker, PackInfo  # noqa: E402
from kvadrupel import cli  # noqa: E402
from kvadrupel.container import Container  # noqa: E402
from rules.context import make_context  # noqa: E402
from rules.ruleset import ActiveRule  # noqa: E402
from shards.copytext import parse_rows  # noqa: E402


class InProcessEvaluator(EvaluatorWorker):
    _compiled: dict[str, CompiledPack] = {}

    def _eval_batch(self, pack: PackInfo, lines: list[bytes], ctx: list[str],
                    run_id: int | None) -> tuple[RangeStats, list[dict[str, Any]], list[Any]]:
        compiled = self._compiled.get(pack.id)
        if compiled is None:
            p = pack.payload
            compiled = self._compiled[pack.id] = CompiledPack(
                [ActiveRule.from_list(r) for r in p["rules"]], p["budget_ms"], pack.id,
                only=p["only"], frozen=p["frozen"], batch_budget_ms=p["batch_budget_ms"])
        stats = RangeStats()
        results, states = evaluate_rows(parse_rows(lines), compiled,
                                        make_context(date.fromisoformat(ctx[0]), ctx[1]),
                                        run_id, stats)
        return stats, results, states


def main() -> int:
    original = Container.evaluator_worker

    def evaluator_worker(self: Container, **kw: Any) -> EvaluatorWorker:
        w = original(self, **kw)
        w.__class__ = InProcessEvaluator
        return w

    Container.evaluator_worker = evaluator_worker  # type: ignore[method-assign]
    return cli.main(["evaluate"])


if __name__ == "__main__":
    sys.exit(main())
