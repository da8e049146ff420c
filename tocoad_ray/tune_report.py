"""Report of a ``tocoad tune`` search: Markdown + JSON + a PNG of validation vs test across trials.

Per category: the trials table (sampled values, status, validation scores, and the test scores
measured afterwards for analysis), the best configuration by validation next to the default
configuration on validation *and* test, and the Spearman rank correlation between the validation
and test rankings of the finished trials: whether the proxy tracks the truth.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .fileio import atomic_write
from .run_report import save_figure

VAL = (("val_score", "val score"), ("val_image_auroc", "val image AUROC"), ("val_pixel_auroc", "val pixel AUROC"),
       ("val_aupro", "val AUPRO"))
TEST = (("test_score", "test score"), ("image_auroc", "test image AUROC"), ("pixel_auroc", "test pixel AUROC"),
        ("aupro", "test AUPRO"))


def _num(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else "–"


def spearman(x: list[float], y: list[float]) -> float | None:
    """Rank correlation of two score lists (None with fewer than 3 pairs or a constant list)."""
    from scipy.stats import spearmanr

    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None]
    if len(pairs) < 3:
        return None
    a, b = map(np.asarray, zip(*pairs))
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def _short(params: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        if isinstance(v, list):
            return "+".join(map(str, v))
        return str(v)

    return ", ".join(f"{k.split('.', 1)[-1] if k.count('.') else k}={fmt(v)}" for k, v in sorted(params.items()))


def val_test_plot(report: dict[str, Any], path: Path) -> Path | None:
    """Per category, validation score (x) vs test score (y) of every trial evaluated on test;
    the best (by validation) and the default marked."""
    cats = [c for c in report["order"] if any(r.get("test") for r in report["trials"] if r["category"] == c)]
    if not cats:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = report["search"]["metric"]
    fig, axes = plt.subplots(1, len(cats), figsize=(4.6 * len(cats), 4.0), squeeze=False)
    for ax, cat in zip(axes[0], cats):
        rows = [r for r in report["trials"] if r["category"] == cat and r.get("test")]
        ax.scatter([r["validation"][metric] for r in rows], [r["test"]["test_score"] for r in rows], s=28,
                   color="tab:blue", label="trials")
        entry = report["categories"][cat]
        for key, style in (("default", dict(marker="s", color="tab:orange")), ("best", dict(marker="*", s=160, color="tab:red"))):
            e = entry.get(key)
            if e and e.get("test"):
                ax.scatter([e["validation"][metric]], [e["test"]["test_score"]], label=key, zorder=3,
                           **{"s": 60, **style})
        rho = entry.get("spearman", {}).get("score")
        ax.set_title(f"{cat}  (Spearman ρ = {_num(rho)})")
        ax.set_xlabel(f"validation: {metric}")
        ax.set_ylabel("test: mean of image AUROC, pixel AUROC, AUPRO")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def build_report(plan, categories: list[str], rows: list[dict[str, Any]], summary: dict[str, dict[str, Any]],
                 info: dict[str, Any]) -> dict[str, Any]:
    metric = plan.search.metric
    for cat in categories:
        done = [r for r in rows if r["category"] == cat and r.get("test")]
        summary[cat]["spearman"] = {
            "score": spearman([r["validation"][metric] for r in done], [r["test"]["test_score"] for r in done]),
            "image_auroc": spearman([r["validation"]["val_image_auroc"] for r in done],
                                    [r["test"]["image_auroc"] for r in done]),
            "n_trials": len(done)}
    search = json.loads(json.dumps(plan.to_dict()["search"]))
    return {"order": categories, "categories": summary, "trials": rows, "search": search,
            "validation_generator": plan.val_generator, "base_config": plan.base.to_dict(), "run": info}


def markdown_report(report: dict[str, Any]) -> str:
    metric = report["search"]["metric"]
    v = report["search"]["validation"]
    lines = [
        "# tocoad tune",
        "",
        f"Objective: **{metric}** on held-out normal training images ({v['fraction']:.0%}, {v['min_images']}–"
        f"{v['max_images']} per category) and as many synthetic anomalies from **{report['validation_generator']}** "
        "(a generator no trial trains with). The test split was read only after selection: for the best and the "
        "default configuration, and for every finished trial in the analysis columns.",
        "",
        "## Best vs default",
        "",
        "| category | configuration | " + " | ".join(n for _, n in VAL) + " | " + " | ".join(n for _, n in TEST) + " |",
        "|---|---|" + "---:|" * (len(VAL) + len(TEST)),
    ]
    for cat in report["order"]:
        e = report["categories"][cat]
        for key in ("best", "default"):
            x = e.get(key)
            if not x:
                err = e.get(f"{key}_error", "no finished trial")
                lines.append(f"| {cat} | {key}: {err} |" + " |" * (len(VAL) + len(TEST)))
                continue
            name = key if key == "default" else ("best: the default" if x["trial"] == "default"
                                                  else f"best: {x['trial']} ({_short(x['params'])})")
            lines.append(f"| {cat} | {name} | " + " | ".join(_num(x["validation"].get(k)) for k, _ in VAL) + " | "
                         + " | ".join(_num((x.get("test") or {}).get(k)) for k, _ in TEST) + " |")
    lines += ["", "## Does validation rank trials like the test set?", "",
              "| category | trials on test | Spearman ρ (score) | Spearman ρ (image AUROC) |", "|---|---:|---:|---:|"]
    for cat in report["order"]:
        s = report["categories"][cat].get("spearman", {})
        lines.append(f"| {cat} | {s.get('n_trials', 0)} | {_num(s.get('score'))} | {_num(s.get('image_auroc'))} |")
    lines += ["", "## Trials", "", "| category | trial | values | status | reports | " + f"{metric} | test score | "
              "test image AUROC |", "|---|---|---|---|---:|---:|---:|---:|"]
    for r in report["trials"]:
        val = (r.get("validation") or {}).get(metric, r["last_reported"].get("val_score"))
        status = r["status"] + (f": {r['error']}" if r.get("error") else "")
        lines.append(f"| {r['category']} | {r['trial'][:28]} | {_short(r['params'])} | {status} | {r['reports']} | "
                     f"{_num(val)} | {_num((r.get('test') or {}).get('test_score'))} | "
                     f"{_num((r.get('test') or {}).get('image_auroc'))} |")
    run = report["run"]
    lines += ["", f"Search {run['search_s']:.0f} s, all {run['total_s']:.0f} s on Ray ({run['address']}, "
              f"{json.dumps(run['resources'])}), {run['max_concurrent_trials']} trials at once. Stopped-early trials "
              "show their last (quick-bank) validation score. Plot: val_vs_test.png; best configurations: best/."]
    return "\n".join(lines) + "\n"


def write_tune_report(out: Path, plan, categories: list[str], rows: list[dict[str, Any]],
                      summary: dict[str, dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    out = Path(out)
    report = build_report(plan, categories, rows, summary, info)
    png = val_test_plot(report, out / "val_vs_test.png")
    report["plot"] = str(png) if png else None
    atomic_write(out / "report.json", lambda p: Path(p).write_text(json.dumps(report, indent=2, default=float)))
    atomic_write(out / "report.md", lambda p: Path(p).write_text(markdown_report(report)))
    return report
