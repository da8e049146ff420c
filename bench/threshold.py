"""Which verdict threshold holds on the real test split: the leave-one-out quantile of normal scores
(``bank.threshold_mode: loo``, the default) or the one set by synthetic anomalies (``synthetic``).

One fit per category with ``threshold_mode: synthetic`` (the artifact records both thresholds; the
bank is the same in either mode), then ``evaluate`` on the test split and, at each threshold, the
false-alarm rate (FPR) on good test images, the recall (TPR) on defective ones, precision and F1.
Prints one JSON line per category, then one summary JSON object (docs/thresholds.md).

    python bench/threshold.py --data DATA_ROOT
    python bench/threshold.py --data DATA_ROOT --set bank.threshold_recall=0.8 --out runs/bench_threshold_r08
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tocoad_ray.artifact import read_meta  # noqa: E402
from tocoad_ray.bank.threshold import rates, synthetic_threshold  # noqa: E402
from tocoad_ray.config import load_config  # noqa: E402
from tocoad_ray.pipeline import evaluate, fit  # noqa: E402

CATEGORIES = "mvtec_ad/bottle,mpdd/metal_plate,magnetic_tile/mt"


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="DATA_ROOT")
    ap.add_argument("--categories", default=CATEGORIES, help="comma-separated DATASET/CATEGORY under --data")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--out", default="runs/bench_threshold")
    ap.add_argument("--reuse", action="store_true", help="evaluate artifacts already in --out instead of refitting")
    ap.add_argument("--sweep", default="0.5,0.8,0.9,0.95,0.99,1.0",
                    help="also these target recalls, from the synthetic and normal scores the artifact recorded")
    args = ap.parse_args()

    import yaml

    overrides = {"method": "patchcore", "bank.threshold_mode": "synthetic"}
    overrides.update({k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)})
    cfg = load_config(None, overrides)
    if cfg.bank.threshold_mode != "synthetic":
        ap.error("bank.threshold_mode must stay synthetic: the artifact must record both thresholds")
    rows = {}
    for item in args.categories.split(","):
        dataset, category = item.rsplit("/", 1)
        root = Path(args.data) / dataset
        art = Path(args.out) / item.replace("/", "_")
        t = time.perf_counter()
        if not (args.reuse and (art / "meta.json").is_file()):
            fit(cfg, root, category, art, progress=False, log=lambda m: print(m, file=sys.stderr))
        meta = read_meta(art)
        res = evaluate(art, root, category, progress=False, return_arrays=True)
        arrays = res.pop("_arrays")
        labels, scores = arrays["labels"], arrays["scores"]
        good, bad = scores[labels == 0], scores[labels == 1]
        th = meta["thresholds"]
        fit_stats = th["synthetic_fit"]
        row = {
            "category": item, "n_test_good": int(len(good)), "n_test_defective": int(len(bad)),
            "n_train": meta["n_train_images"], "image_auroc": res["image_auroc"],
            "synthetic_on_fit": {k: fit_stats[k] for k in ("generator", "bound", "recall", "fpr", "target_recall",
                                                           "max_fpr", "n_normal", "n_anomalous")},
            "thresholds": {},
            "wall_s": time.perf_counter() - t,
        }
        for name in ("loo", "synthetic"):
            r = rates(good, bad, th[name])
            row["thresholds"][name] = {"threshold": th[name], "test_fpr": r["fpr"], "test_tpr": r["tpr"],
                                       "test_precision": r["precision"], "test_f1": r["f1"]}
        # other recall targets from the same recorded fit-time scores (no refit: the bank is the same)
        row["sweep"] = []
        for target in (float(v) for v in args.sweep.split(",") if v):
            st = synthetic_threshold(np.array(fit_stats["normal_scores"]), np.array(fit_stats["anomalous_scores"]),
                                     target, fit_stats["max_fpr"])
            r = rates(good, bad, st.threshold)
            row["sweep"].append({"target_recall": target, "threshold": st.threshold, "bound": st.bound,
                                 "synthetic_recall": st.recall, "test_fpr": r["fpr"], "test_tpr": r["tpr"],
                                 "test_f1": r["f1"]})
        # the active threshold's rates are what `tocoad evaluate` reports
        assert np.isclose(row["thresholds"]["synthetic"]["test_tpr"], res["threshold_tpr"])
        rows[item] = row
        print(json.dumps(row), flush=True)
    print(json.dumps({"bench": "threshold", "commit": _commit(), "machine": platform.platform(),
                      "cpu": platform.processor() or platform.machine(), "command": " ".join(sys.argv),
                      "config": {k: getattr(cfg.bank, k) for k in ("threshold_quantile", "threshold_images",
                                                                   "threshold_recall", "threshold_max_fpr",
                                                                   "threshold_generator")}
                      | {"method": cfg.method, "backbone": cfg.backbone.name, "generator": cfg.generator.kind},
                      "categories": rows}, indent=2))


if __name__ == "__main__":
    main()
