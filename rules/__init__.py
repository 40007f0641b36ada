"""Rules: the sandbox analysts' rules run in, their helpers, and the combined evaluator.

* :func:`rules.sandbox.compile_rule` -> :class:`rules.sandbox.CompiledRule`
* :class:`rules.ruleset.RuleSet` / :class:`rules.ruleset.RuleSpec` / :class:`rules.ruleset.Outcome`
* :func:`rules.context.make_context` -> :class:`rules.context.Context`
* :mod:`rules.helpers` (the globals rules see), :mod:`rules.pack` (built-in rules),
  :mod:`rules.budget` (time budgets)

docs/rules.md is the analysts' reference.
"""
