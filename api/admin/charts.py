"""Geometry for the inline SVG charts (sparklines, bars, lines).

Only numbers are computed here; the templates (``_charts.html``) draw them, so
every label goes through Jinja's autoescaping like any other text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["bars", "lines", "sparkline"]


def _fmt(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def sparkline(values: Sequence[float | None], width: int = 120, height: int = 24) -> dict[str, Any]:
    """A polyline over ``values`` (oldest first); ``None`` (rule absent from a run) counts as 0."""
    vals = [float(v or 0) for v in values]
    top = max(vals, default=0.0) or 1.0
    n = len(vals)
    step = width / max(n - 1, 1)
    pts = [
        (i * step if n > 1 else width / 2, height - 2 - (v / top) * (height - 4))
        for i, v in enumerate(vals)
    ]
    return {
        "width": width,
        "height": height,
        "n": n,
        "points": " ".join(f"{_fmt(x)},{_fmt(y)}" for x, y in pts),
        "last": pts[-1] if pts else None,
        "max": max(vals, default=0.0),
        "last_value": vals[-1] if vals else None,
    }


def bars(
    items: Sequence[tuple[str, float, float | None, float | None]],
    width: int = 960,
    height: int = 220,
) -> dict[str, Any]:
    """Bars for ``(label, value, low, high)`` items (low/high: an interval, drawn as a whisker)."""
    pad_l, pad_b, pad_t = 48, 28, 10
    inner_w, inner_h = width - pad_l - 8, height - pad_b - pad_t
    top = max([max(v, hi or 0) for _, v, _, hi in items], default=0.0) or 1.0
    n = max(len(items), 1)
    slot = inner_w / n
    out = []
    for i, (label, v, lo, hi) in enumerate(items):
        h = v / top * inner_h
        x = pad_l + i * slot + slot * 0.1
        bar = {
            "label": label,
            "value": v,
            "x": _fmt(x),
            "w": _fmt(slot * 0.8),
            "y": _fmt(pad_t + inner_h - h),
            "h": _fmt(h),
            "low": lo,
            "high": hi,
        }
        if lo is not None and hi is not None and hi > lo:
            bar["wx"] = _fmt(x + slot * 0.4)
            bar["wy1"] = _fmt(pad_t + inner_h - lo / top * inner_h)
            bar["wy2"] = _fmt(pad_t + inner_h - hi / top * inner_h)
        out.append(bar)
    return {
        "width": width,
        "height": height,
        "bars": out,
        "max": top,
        "base_y": _fmt(pad_t + inner_h),
        "top_y": _fmt(pad_t),
        "left": pad_l,
        "right": _fmt(width - 8),
        "first": items[0][0] if items else "",
        "last": items[-1][0] if items else "",
        "label_y": _fmt(height - 8),
        "total": sum(v for _, v, _, _ in items),
    }


def lines(
    labels: Sequence[str],
    series: dict[str, Sequence[float]],
    width: int = 1100,
    height: int = 220,
    max_series: int = 8,
) -> dict[str, Any]:
    """One polyline per series over shared x ``labels`` (the ``max_series`` largest kept)."""
    pad_l, pad_b, pad_t = 48, 28, 10
    inner_w, inner_h = width - pad_l - 8, height - pad_b - pad_t
    ranked = sorted(series.items(), key=lambda kv: -sum(kv[1]))[:max_series]
    top = max((max(vs, default=0) for _, vs in ranked), default=0) or 1
    n = len(labels)
    step = inner_w / max(n - 1, 1)
    out = []
    for idx, (name, vs) in enumerate(ranked):
        pts = " ".join(
            f"{_fmt(pad_l + i * step)},{_fmt(pad_t + inner_h - v / top * inner_h)}"
            for i, v in enumerate(vs)
        )
        out.append(
            {
                "name": name,
                "points": pts,
                "cls": f"c{idx % 8}",
                "last": vs[-1] if vs else 0,
                "total": sum(vs),
            }
        )
    return {
        "width": width,
        "height": height,
        "series": out,
        "max": top,
        "base_y": _fmt(pad_t + inner_h),
        "top_y": _fmt(pad_t),
        "left": pad_l,
        "right": _fmt(width - 8),
        "first": labels[0] if labels else "",
        "last": labels[-1] if labels else "",
        "label_y": _fmt(height - 8),
        "single": n == 1,
    }
