"""The helper library's documentation, shown beside the rule editor.

The short reference is built from the helpers themselves (signature and first
paragraph of each docstring in :data:`rules.helpers.HELPERS`), so it cannot drift
from the code. The full guide is ``docs/rules.md`` when the checkout has it,
rendered with markdown-it (raw HTML disabled, unsafe link schemes refused).
"""

from __future__ import annotations

import inspect
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt

from rules.helpers import HELPERS

__all__ = ["GUIDE_PATH", "guide_html", "helper_reference"]

GUIDE_PATH = Path(__file__).resolve().parents[2] / "docs" / "rules.md"


@lru_cache(maxsize=1)
def helper_reference() -> list[dict[str, Any]]:
    out = []
    for name, fn in HELPERS.items():
        try:
            full = inspect.signature(fn)
            sig = str(
                full.replace(
                    parameters=[
                        p.replace(annotation=inspect.Parameter.empty)
                        for p in full.parameters.values()
                    ],
                    return_annotation=inspect.Signature.empty,
                )
            )
        except (TypeError, ValueError):
            sig = "(...)"
        doc = inspect.getdoc(fn) or ""
        first = _ROLE.sub(r"\1", doc.split("\n\n", 1)[0].replace("\n", " "))
        # ``code`` spans become (is_code, text) parts: the template marks them up, escaped.
        parts = [(i % 2 == 1, text) for i, text in enumerate(first.split("``")) if text]
        out.append({"name": name, "signature": f"{name}{sig}", "doc": first, "parts": parts})
    return out


_ROLE = re.compile(r":[a-z]+:`([^`]*)`")


_MD = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")


def guide_html() -> str | None:
    """``docs/rules.md`` as HTML, or None where the file is not there (an installed wheel)."""
    try:
        stat = GUIDE_PATH.stat()
    except OSError:
        return None
    return _render(str(GUIDE_PATH), stat.st_mtime_ns)


@lru_cache(maxsize=4)
def _render(path: str, _mtime: int) -> str:
    html: str = _MD.render(Path(path).read_text(encoding="utf-8"))
    return html
