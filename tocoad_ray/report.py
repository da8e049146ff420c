"""Write per-category benchmark results as JSON and a Markdown table."""
from __future__ import annotations

import json
import math
import numbers
from pathlib import Path

from .fileio import atomic_write

__all__ = ["with_mean", "markdown_table", "write_results"]

MEAN_KEY = "mean"
METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "f1_threshold")
MISSING = "\u2013"  # en dash for None in Markdown


def _is_number(v) -> bool:
    # bool is an int subclass but averaging flags makes no sense.
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _plain(v):
    """numpy scalars -> Python; non-finite floats -> None (JSON has no NaN)."""
    if _is_number(v):
        if isinstance(v, numbers.Integral):
            return int(v)
        v = float(v)
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _columns(results: dict) -> list[str]:
    """Union of keys in first-seen order, metric keys first."""
    seen: dict[str, None] = {}
    for row in results.values():
        for k in row:
            seen.setdefault(k, None)
    metrics = [k for k in METRIC_KEYS if k in seen]
    return metrics + [k for k in seen if k not in METRIC_KEYS]


def with_mean(results: dict[str, dict]) -> dict[str, dict]:
    """Copy of ``results`` (plain Python values) with a ``"mean"`` row.

    The mean of each numeric key is taken over the categories that have a
    number for it (None / NaN are skipped); keys with no number are None.
    An existing ``"mean"`` row is recomputed, never averaged into itself.
    """
    rows = {str(c): _plain(dict(r)) for c, r in results.items() if c != MEAN_KEY}
    mean: dict = {}
    for k in _columns(rows):
        vals = [r[k] for r in rows.values() if _is_number(r.get(k))]
        numeric_col = all(r.get(k) is None or _is_number(r.get(k)) for r in rows.values())
        if numeric_col:
            mean[k] = sum(vals) / len(vals) if vals else None
    rows[MEAN_KEY] = mean
    return rows


def _is_time_key(key: str) -> bool:
    k = key.lower()
    return (
        k.startswith("ms_")
        or k.endswith(("_ms", "_s", "_sec", "_seconds"))
        or "seconds" in k
        or "time" in k
    )


def _fmt(key: str, v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return MISSING
    if isinstance(v, bool) or not _is_number(v):
        return str(v)
    if isinstance(v, numbers.Integral):
        return str(int(v))
    # Times are only meaningful to ~0.1 ms / 0.1 s; metrics need 3 decimals.
    return f"{v:.1f}" if _is_time_key(key) else f"{v:.3f}"


def markdown_table(results: dict[str, dict]) -> str:
    """Markdown table, one row per category (the ``"mean"`` row last if present)."""
    cats = [c for c in results if c != MEAN_KEY] + ([MEAN_KEY] if MEAN_KEY in results else [])
    cols = _columns({c: results[c] for c in cats})
    lines = [
        "| " + " | ".join(["category", *cols]) + " |",
        "|" + "|".join(["---", *(["---:"] * len(cols))]) + "|",
    ]
    for c in cats:
        cells = [f"**{c}**" if c == MEAN_KEY else str(c)]
        cells += [_fmt(k, results[c].get(k)) for k in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    # Write next to the target and os.replace it: readers never see a partial file.
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_results(results: dict[str, dict], json_path, md_path=None, mean: bool = True) -> dict[str, dict]:
    """Write ``results`` (category -> metrics dict) plus a ``"mean"`` row.

    JSON is written atomically (NaN becomes null); if ``md_path`` is given, the
    :func:`markdown_table` too. Returns the dict that was written.
    """
    rows = with_mean(results) if mean else {str(c): _plain(dict(r)) for c, r in results.items()}
    _atomic_write(Path(json_path), json.dumps(rows, indent=2, allow_nan=False) + "\n")
    if md_path is not None:
        _atomic_write(Path(md_path), markdown_table(rows))
    return rows
