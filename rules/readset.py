"""What a rule can read of a profile: its read-set, worked out from the source.

After an event changes some paths of a profile, only the rules whose read-set
meets those paths can answer differently (time aside: that is the wake-up index's
job), so ingest re-evaluates only them. The read-set is an over-approximation —
it may name more than the rule reads, never less:

* a profile access with literal keys narrows the path: ``profile["a"]["b"]``,
  ``profile.get("a")``, ``dict.get(profile, "a")``, ``get(profile, "a.b")``,
  ``has(profile, "a.b")`` read ``a.b``;
* a name bound to such an access (``lic = profile.get("driver_license") or {}``)
  carries its path: ``lic.get("expires_on")`` reads ``driver_license.expires_on``;
* any other use of a profile value — iterating it, ``len``, ``in``, ``.items()``,
  a dynamic key, passing it to any other function, storing it in a container —
  reads everything below the path reached so far; at the profile itself, that is
  every path (the read-set is None).

A rule that shadows the helpers (defines its own ``get``/``has``/``dict``) gets no
narrowing through them. Names are tracked by name across the whole source (a name
bound to a profile path anywhere counts everywhere): coarser, never unsound.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable

__all__ = ["affected", "event_paths", "read_set"]

Path = tuple[str, ...]
_NARROWING_HELPERS = ("get", "has")
_MAX_PASSES = 20


def read_set(source: str) -> frozenset[str] | None:
    """The dotted profile paths ``source`` (a rule defining ``match(profile, ctx)``)
    can read, or None for "every path" (also when the source does not parse or
    has no ``match``)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    match = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "match"),
                 None)
    if match is None or not match.args.args:
        return None
    # A goal (rules/goals.py) is evaluated with the rule: its reads are the rule's too.
    goal = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "goal"),
                None)
    roots = {match.args.args[0].arg}
    if goal is not None:
        if not goal.args.args:
            return None
        roots.add(goal.args.args[0].arg)
    shadowed = _bound_names(tree) & {*_NARROWING_HELPERS, "dict"}
    analysis = _Analysis({r: {()} for r in roots}, shadowed)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for _ in range(_MAX_PASSES):
        before = {k: set(v) for k, v in analysis.env.items()}
        analysis.reads.clear()
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) \
                    and node.id in analysis.env:
                analysis.occurrence(node, parents)
        if analysis.env == before:
            break
    else:
        return None
    if () in analysis.reads:
        return None
    paths = sorted(analysis.reads)
    kept = [p for p in paths if not any(q != p and p[:len(q)] == q for q in paths)]
    return frozenset(".".join(p) for p in kept)


def affected(reads: frozenset[str] | None, changed: Iterable[str] | None) -> bool:
    """Whether a rule with read-set ``reads`` can see a change at any of the
    ``changed`` paths (None: unknown, anything may have changed)."""
    if reads is None or changed is None:
        return True
    for c in changed:
        for r in reads:
            if r == c or r.startswith(c + ".") or c.startswith(r + "."):
                return True
    return False


def event_paths(ops: dict[str, object]) -> list[str]:
    """The dotted paths an event's operations (``set``, ``unset``, ``inc``,
    ``append``, ``max``, ``min``; engine/messages/event.py) can change. An object
    set deep-merges, so its leaves are the paths; an empty object, its own path."""
    out: list[str] = []
    for name, value in ops.items():
        if name == "unset" and isinstance(value, list):
            out += [p for p in value if isinstance(p, str)]
        elif name == "set" and isinstance(value, dict):
            _leaves(value, "", out)
        elif isinstance(value, dict):
            out += [k for k in value if isinstance(k, str)]
    return out


def _leaves(obj: dict[object, object], prefix: str, out: list[str]) -> None:
    for k, v in obj.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            _leaves(v, path + ".", out)
        else:
            out.append(path)


def _bound_names(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {a.asname or a.name.split(".")[0] for a in node.names}
    return names


def _const_str(node: ast.AST | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _key(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int)) \
            and not isinstance(node.value, bool):
        return str(node.value)
    return None


class _Analysis:
    def __init__(self, env: dict[str, set[Path]], shadowed: set[str]) -> None:
        self.env = env
        self.shadowed = shadowed
        self.reads: set[Path] = set()

    def occurrence(self, name: ast.Name, parents: dict[ast.AST, ast.AST]) -> None:
        """Follow the accessor chain up from a profile-valued name; then bind or read."""
        for base in list(self.env[name.id]):
            node: ast.AST = name
            path = base
            while True:
                step = self._narrow(node, parents)
                if step is None:
                    break
                node, extra = step
                path = path + extra
            self._use(node, path, parents)

    def _narrow(self, node: ast.AST, parents: dict[ast.AST, ast.AST]
                ) -> tuple[ast.AST, Path] | None:
        parent = parents.get(node)
        if isinstance(parent, ast.Subscript) and parent.value is node \
                and isinstance(parent.ctx, ast.Load):
            key = _key(parent.slice)
            return (parent, (key,)) if key is not None else None
        if isinstance(parent, ast.Attribute) and parent.value is node and parent.attr == "get":
            call = parents.get(parent)
            if isinstance(call, ast.Call) and call.func is parent and call.args \
                    and not call.keywords:
                key = _key(call.args[0])
                return (call, (key,)) if key is not None else None
            return None
        if isinstance(parent, ast.Call) and parent.args and parent.args[0] is node \
                and not parent.keywords:
            f = parent.func
            if isinstance(f, ast.Name) and f.id in _NARROWING_HELPERS \
                    and f.id not in self.shadowed and len(parent.args) >= 2:
                text = _const_str(parent.args[1])
                return (parent, tuple(text.split("."))) if text else None
            if isinstance(f, ast.Attribute) and f.attr == "get" and isinstance(f.value, ast.Name) \
                    and f.value.id == "dict" and "dict" not in self.shadowed \
                    and len(parent.args) >= 2:
                key = _key(parent.args[1])
                return (parent, (key,)) if key is not None else None
        return None

    def _use(self, node: ast.AST, path: Path, parents: dict[ast.AST, ast.AST]) -> None:
        """A profile value at ``path`` used as ``node``: bound to a name (its later
        uses are followed), or read whole."""
        target, tested = self._bound_to(node, parents)
        if target is not None:
            self.env.setdefault(target, set()).add(path)
            if tested:  # ``x or {}`` tested x's truth: that reads all of it
                self.reads.add(path)
            return
        self.reads.add(path)

    def _bound_to(self, node: ast.AST, parents: dict[ast.AST, ast.AST]
                  ) -> tuple[str | None, bool]:
        # Through ``x or {}`` / ``a if t else b`` (as a value, not the test)
        tested = False
        parent = parents.get(node)
        while isinstance(parent, (ast.BoolOp, ast.IfExp)):
            if isinstance(parent, ast.IfExp) and parent.test is node:
                return None, True
            if isinstance(parent, ast.BoolOp) and parent.values[-1] is not node:
                tested = True
            node, parent = parent, parents.get(parent)
        return self._target(node, parent), tested

    @staticmethod
    def _target(node: ast.AST, parent: ast.AST | None) -> str | None:
        if isinstance(parent, ast.Assign) and parent.value is node and len(parent.targets) == 1 \
                and isinstance(parent.targets[0], ast.Name):
            return parent.targets[0].id
        if isinstance(parent, ast.NamedExpr) and parent.value is node:
            return parent.target.id
        if isinstance(parent, ast.AnnAssign) and parent.value is node \
                and isinstance(parent.target, ast.Name):
            return parent.target.id
        return None
