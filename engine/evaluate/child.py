"""The rule sandbox child process: ``python -m engine.evaluate.child``.

Started and fed by a :class:`rules.isolation.SandboxPool`; every piece of analyst
code (rules, templates, "why") that the engine, the API or the CLI runs is
evaluated here. The ops, each ``(meta, body) -> (meta, body)``:

* ``eval``: a batch of profile rows (COPY text, shards/copytext.py) through a
  compiled pack (engine/evaluate/evaluation.py): result messages, new states, figures;
* ``confirm_timeout`` / ``confirm_slow``: re-run one rule alone before quarantine;
* ``grid``: a rule set over docs × dates, match bit masks (audience questions,
  examples, the test panel);
* ``render``: banner/e-mail templates for one profile;
* ``explain``: the "why" of one rule on one profile.

This process holds no connection and no secret; if a rule crashes it, the
caller finds out which (engine/evaluate/worker.py) and nothing else is lost.
"""

from __future__ import annotations

import hashlib
from datetime import date
from typing import Any

import orjson

from engine.evaluate.evaluation import (
    CompiledPack,
    RangeStats,
    confirm_slow,
    confirm_timeout,
    evaluate_rows,
)
from engine.messages import EvalAnswer, encode
from rules.context import Context, make_context
from rules.isolation import serve
from rules.ruleset import ActiveRule, RuleSet, RuleSpec
from shards.copytext import parse_rows, split_lines

_rulesets: dict[str, RuleSet] = {}
_packs: dict[str, CompiledPack] = {}


def _ctx(pair: Any) -> Context:
    as_of, tz = pair
    return make_context(date.fromisoformat(as_of), tz)


def _ruleset(specs: list[list[Any]], budget_ms: float) -> RuleSet:
    key = hashlib.sha256(orjson.dumps([specs, budget_ms])).hexdigest()
    rs = _rulesets.get(key)
    if rs is None:
        rs = RuleSet([RuleSpec(k, int(v), src, int(p), g) for k, v, src, p, g in specs],
                     budget_ms=budget_ms)
        _rulesets[key] = rs
        while len(_rulesets) > 32:
            _rulesets.pop(next(iter(_rulesets)))
    return rs


# What an operation answers: (meta JSON, body bytes).
_Reply = tuple[dict[str, Any], bytes]


def _pack(meta: dict[str, Any], cache: dict[str, Any]) -> CompiledPack:
    key = meta["pack"]
    pack = _packs.get(key)
    if pack is None:
        spec = cache[key]
        rules = [ActiveRule.from_list(r) for r in spec["rules"]]
        pack = CompiledPack(rules, spec["budget_ms"], key, only=spec["only"],
                            frozen=spec["frozen"], batch_budget_ms=spec["batch_budget_ms"])
        _packs[key] = pack
        while len(_packs) > 8:
            _packs.pop(next(iter(_packs)))
    return pack


def op_eval(meta: dict[str, Any], body: bytes, cache: dict[str, Any]) -> _Reply:
    pack = _pack(meta, cache)
    stats = RangeStats()
    rows = parse_rows(split_lines(body))
    results, states = evaluate_rows(rows, pack, _ctx(meta["ctx"]), meta.get("run_id"), stats)
    return {"stats": stats.to_json()}, encode(EvalAnswer(results=results, states=states))


def op_confirm_timeout(meta: dict[str, Any], body: bytes, cache: dict[str, Any]
                       ) -> _Reply:
    pack = _pack(meta, cache)
    [(_, doc, _)] = parse_rows(split_lines(body))
    return {"confirmed": confirm_timeout(pack, meta["key"], doc, _ctx(meta["ctx"]))}, b""


def op_confirm_slow(meta: dict[str, Any], body: bytes, cache: dict[str, Any]
                    ) -> _Reply:
    pack = _pack(meta, cache)
    docs = (d for _, d, _ in parse_rows(split_lines(body)))
    return {"confirmed": confirm_slow(pack, meta["key"], docs, _ctx(meta["ctx"]),
                                      float(meta["batch_budget_ms"]))}, b""


def op_grid(meta: dict[str, Any], body: bytes, _cache: dict[str, Any]) -> _Reply:
    specs = meta["specs"]
    rs = _ruleset(specs, float(meta["budget_ms"]))
    bit = {s[0]: 1 << i for i, s in enumerate(specs)}
    ctxs = [_ctx(c) for c in meta["ctxs"]]
    docs = orjson.loads(body)
    per_doc = meta.get("per_doc", False)  # ctxs[i] belongs to docs[i] (examples)
    masks: list[list[int]] = []
    errors: list[list[Any]] = []
    timeouts: list[list[Any]] = []
    evaluate = rs.evaluate
    for i, doc in enumerate(docs):
        row = []
        for j, ctx in enumerate([ctxs[i]] if per_doc else ctxs):
            out = evaluate(doc, ctx)
            m = 0
            for k in out.matched:
                m |= bit[k]
            row.append(m)
            for k, msg in out.errors.items():
                errors.append([i, j, k, msg])
            for k in out.timeouts:
                timeouts.append([i, j, k])
        masks.append(row)
    return {}, orjson.dumps({"m": masks, "e": errors, "t": timeouts})


def op_render(meta: dict[str, Any], body: bytes, _cache: dict[str, Any]) -> _Reply:
    from rules.templates import render_content

    profile = orjson.loads(body)
    ctx = _ctx(meta["ctx"])
    out: dict[str, Any] = {}
    for part, spec in meta["parts"].items():
        try:
            out[part] = render_content(spec, profile, ctx)
        except Exception as exc:  # noqa: BLE001 - a template error is the answer
            out[f"{part}_error"] = str(exc)[:2000]
    return {}, orjson.dumps(out)


def op_explain(meta: dict[str, Any], body: bytes, _cache: dict[str, Any]) -> _Reply:
    from rules.why import explain

    why = explain(meta["key"], int(meta["version"]), meta["source"], orjson.loads(body),
                  _ctx(meta["ctx"]), float(meta["budget_ms"]))
    return {}, orjson.dumps(why, default=str)


HANDLERS = {"eval": op_eval, "confirm_timeout": op_confirm_timeout,
            "confirm_slow": op_confirm_slow, "grid": op_grid, "render": op_render,
            "explain": op_explain, "ping": lambda m, b, c: ({}, b"")}


def main() -> None:
    serve(HANDLERS)


if __name__ == "__main__":
    main()
