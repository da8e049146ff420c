"""Report of a multi-category training run (``tocoad train-all``): Markdown + JSON with, per
category, the method's metrics next to the frozen-F PatchCore baseline built in the same run,
per-stage times and workers, the config, and a PNG of each category's per-epoch losses."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .config import Config
from .fileio import atomic_write

METRICS = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO"), ("f1_max", "F1-max"))
TIMES = (("stage1_s", "stage I (s)"), ("stage2_s", "stage II (s)"), ("bank_build_s", "bank (s)"),
         ("evaluate_s", "evaluate (s)"), ("total_s", "category total (s)"))


def _num(v: Any, fmt: str = "{:.3f}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else "–"


def loss_plot(result: dict[str, Any], path: Path) -> Path | None:
    """Per-epoch losses of stage I and stage II (one panel each)."""
    hist = result.get("histories") or {}
    stages = [s for s in ("stage1", "stage2") if hist.get(s)]
    if not stages:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        rows = hist[stage]
        epochs = [r["epoch"] for r in rows]
        for key in sorted({k for r in rows for k in r.get("losses", {})}):
            ax.plot(epochs, [r["losses"].get(key, float("nan")) for r in rows], marker="o", label=key)
        ax.set_title(f"{result['category']}: {'stage I (D)' if stage == 'stage1' else 'stage II (F + C)'}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Lay out, write atomically as PNG, and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return path


def _val(r: dict[str, Any], method: str) -> str:
    sel = r.get("selection") or {}
    v = (sel.get("validation") or {}).get(method, {}).get("val_score")
    return _num(v, "{:.4f}")


def markdown_report(report: dict[str, Any]) -> str:
    """The per-category table: the fine-tuned model next to its frozen-F PatchCore baseline, each
    with its validation score (``distributed.select``) and which of them the category ships."""
    head = ["category", "model", *(n for _, n in METRICS), "Δ image AUROC", "validation score", "shipped",
            *(n for _, n in TIMES), "workers"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|"]
    for cat in report["order"]:
        r = report["categories"][cat]
        if r["status"] != "ok":
            lines.append(f"| {cat} | **failed** | {r['error']} |" + " |" * (len(head) - 3))
            continue
        sel = r.get("selection") or {}
        shipped = sel.get("shipped", r["method"])
        b, t = r.get("baseline"), r.get("timings", {})
        # the method row shows the fine-tuned model: its own evaluation when PatchCore was shipped
        m = (r.get("finetuned") or r["metrics"]) if shipped == "patchcore" else r["metrics"]
        delta = (m.get("image_auroc") - b.get("image_auroc")) if b and isinstance(m.get("image_auroc"), float) \
            and isinstance(b.get("image_auroc"), float) else None
        name = r["method"] + (" (earlier run)" if r.get("skipped") else "")
        mark = lambda method: "**yes**" if shipped == method else ("no" if sel else "")  # noqa: E731
        lines.append("| " + " | ".join([cat, name, *(_num(m.get(k)) for k, _ in METRICS), _num(delta, "{:+.3f}"),
                                         _val(r, r["method"]), mark(r["method"]),
                                         *(_num(t.get(k), "{:.1f}") for k, _ in TIMES), str(r.get("workers", ""))]) + " |")
        if b:
            lines.append("| " + " | ".join([cat, "patchcore (frozen F, same run)", *(_num(b.get(k)) for k, _ in METRICS),
                                             "", _val(r, "patchcore"), mark("patchcore"), "", "",
                                             _num(b.get("bank_build_s"), "{:.1f}"), "", _num(t.get("baseline_s"), "{:.1f}"),
                                             ""]) + " |")
        if sel.get("reason"):
            lines.append(f"| {cat} | *{sel['reason']}* |" + " |" * (len(head) - 2))
    return "\n".join(lines) + "\n"


def write_run_report(out: Path, cfg: Config, results: dict[str, dict[str, Any]], order: list[str], wall_s: float,
                     cluster: dict[str, Any]) -> dict[str, Any]:
    """Write ``out/report.json``, ``out/report.md`` and ``out/work/<category>/losses.png``."""
    out = Path(out)
    plots = {}
    for cat in order:
        r = results.get(cat)
        if r and r.get("status") == "ok":
            p = loss_plot(r, out / "work" / cat / "losses.png")
            if p is not None:
                plots[cat] = str(p.relative_to(out))
    report = {"order": order, "categories": {c: results[c] for c in order if c in results}, "wall_s": wall_s,
              "cluster": cluster, "config": cfg.to_dict(), "plots": plots}
    md = ["# train-all report\n", f"Wall time {wall_s:.1f} s on Ray ({cluster.get('address')}, "
          f"{cluster.get('resources')}); method `{cfg.method}`, "
          f"{cfg.distributed.num_workers} DDP workers per category (both stages), "
          f"seed {cfg.seed}. Each method row stands next to the frozen-F PatchCore bank built in the same run "
          f"(Δ = method − PatchCore); test metrics of both, and which one the category ships "
          f"(`distributed.select: {cfg.distributed.select}`: the better validation score on held-out normal images "
          f"and synthetic anomalies, never the test set).\n", markdown_report(report)]
    for cat, p in plots.items():
        md.append(f"\n![{cat} losses]({p})\n")
    md.append("\n## Config\n\n```yaml\n" + cfg.to_yaml() + "```\n")
    atomic_write(out / "report.json", lambda p: p.write_text(json.dumps(report, indent=2, default=float)))
    atomic_write(out / "report.md", lambda p: p.write_text("".join(md)))
    return report
