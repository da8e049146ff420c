"""ToCoAD with a chosen configuration against frozen-F PatchCore, over several seeds.

For each category, the ToCoAD configuration (e.g. ``tocoad tune``'s ``best/<category>.yaml``,
chosen on validation only) is fitted on all training images with each seed, and so is PatchCore
with the *same* config but ``method: patchcore`` (same backbone, layers, resolution, coreset, b,
seed). Both are evaluated on the test split. Prints JSON: per seed, mean, seed-to-seed spread
(max − min over seeds) and a verdict per metric:

* level: mean(ToCoAD) ≥ mean(PatchCore) − max(PatchCore's spread, 0.001): within the baseline's
  own seed noise (a noisy ToCoAD does not count as level because its own spread is wide);
* ahead: mean(ToCoAD) − mean(PatchCore) > spread, with spread = the larger of the two methods'.

    python bench/tocoad_vs_patchcore.py --data DATA3 --categories bottle,metal_plate,magnetic_tile \
        --configs runs/tune-stage2/best --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tocoad_ray.config import build_config  # noqa: E402
from tocoad_ray.pipeline import evaluate, fit  # noqa: E402

METRICS = ("image_auroc", "pixel_auroc", "aupro")
LEVEL_TOLERANCE = 0.001  # floor of the seed spread that "level" allows


def run_key(cfg) -> str:
    """What the artifact depends on: PatchCore ignores the training sections, so every ToCoAD
    configuration of a category shares its PatchCore run per seed."""
    d = cfg.to_dict()
    if cfg.method == "patchcore":
        b = d["backbone"]
        d = {"seed": d["seed"], "data": d["data"], "bank": d["bank"],
             "backbone": {k: b[k] for k in ("name", "layers", "weights")}}
    d.pop("distributed", None)
    return f"{cfg.method}-seed{cfg.seed}-" + hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def one(cfg, data: str, category: str, out: Path) -> dict:
    """Fit (once per distinct configuration: re-runs reuse the artifact) and evaluate on test."""
    t = time.perf_counter()
    if not (out / "meta.json").is_file():
        fit(cfg, data, category, out, progress=False, log=lambda s: None)
    res = evaluate(out, data, category, progress=False)
    return {**{m: float(res[m]) for m in METRICS if m in res}, "seconds": time.perf_counter() - t}


def verdicts(tocoad: list[dict], patchcore: list[dict]) -> dict:
    out = {}
    for m in METRICS:
        a, b = np.array([r[m] for r in tocoad]), np.array([r[m] for r in patchcore])
        spread = float(max(np.ptp(a), np.ptp(b)))
        diff = float(a.mean() - b.mean())
        out[m] = {"tocoad_mean": float(a.mean()), "patchcore_mean": float(b.mean()), "diff": diff,
                  "tocoad_spread": float(np.ptp(a)), "patchcore_spread": float(np.ptp(b)), "spread": spread,
                  "level": diff >= -max(float(np.ptp(b)), LEVEL_TOLERANCE), "ahead": diff > spread}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a folder holding the categories (MVTec layout)")
    ap.add_argument("--categories", default="bottle,metal_plate,magnetic_tile")
    ap.add_argument("--configs", required=True, help="folder of <category>.yaml (tocoad tune's best/), or one YAML for all")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="runs/tocoad_vs_patchcore", help="artifacts (reused across runs) and report.json")
    ap.add_argument("--report", default=None, help="report file name under --out (default report.json)")
    args = ap.parse_args()
    import yaml

    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    report = {"bench": "tocoad_vs_patchcore", "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
              "seeds": seeds, "categories": {}}
    for cat in args.categories.split(","):
        path = Path(args.configs)
        path = path / f"{cat}.yaml" if path.is_dir() else path
        base = yaml.safe_load(path.read_text())
        base.pop("search", None)  # a tune search file: its base config
        runs = {"tocoad": [], "patchcore": []}
        for seed in seeds:
            for method in runs:
                cfg = build_config(base, {"seed": seed, "method": method})
                r = one(cfg, args.data, cat, out / cat / run_key(cfg))
                runs[method].append({"seed": seed, **r})
                print(json.dumps({"category": cat, "method": method, **runs[method][-1]}), file=sys.stderr, flush=True)
        report["categories"][cat] = {"config": str(path), "stage2": base.get("stage2"), "runs": runs,
                                     "verdict": verdicts(runs["tocoad"], runs["patchcore"])}
    out.mkdir(parents=True, exist_ok=True)
    (out / (args.report or "report.json")).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
