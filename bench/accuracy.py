"""Fit + evaluate over several categories; one JSON line per category, then a Markdown table.

    python bench/accuracy.py --data DATA_ROOT --categories mvtec_ad/bottle,magnetic_tile/mt,mpdd/metal_plate
    python bench/accuracy.py --protocol anchor ...   # how anomalib's reference figure was measured

Protocols (docs/benchmarks.md): ``paper`` = resize 256, centre crop 224 (the
library default); ``anchor`` = 256×256, no crop.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tocoad_ray.config import load_config  # noqa: E402
from tocoad_ray.pipeline import evaluate, fit  # noqa: E402
from tocoad_ray.report import markdown_table, write_results  # noqa: E402

PROTOCOLS = {"paper": ROOT / "configs" / "paper.yaml", "anchor": ROOT / "configs" / "anchor.yaml"}
METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "bank_build_s", "fit_s", "ms_per_image", "n_test")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--categories", default="mvtec_ad/bottle,magnetic_tile/mt,mpdd/metal_plate",
                    help="comma-separated DATASET/CATEGORY under --data")
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), default="paper")
    ap.add_argument("--config", help="YAML config instead of the protocol's")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="runs/bench_accuracy")
    ap.add_argument("--md", help="also write the table here")
    args = ap.parse_args()

    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    cfg = load_config(args.config or PROTOCOLS[args.protocol], overrides)
    out = Path(args.out)
    results = {}
    for item in args.categories.split(","):
        dataset, category = item.rsplit("/", 1)
        root = Path(args.data) / dataset
        art = out / args.protocol / item.replace("/", "_")
        t = time.perf_counter()
        fit(cfg, root, category, art, progress=False, log=lambda m: print(m, file=sys.stderr))
        res = evaluate(art, root, category, progress=False)
        res["wall_s"] = time.perf_counter() - t
        results[item] = {k: res.get(k) for k in METRICS}
        print(json.dumps({
            "category": item, **res,
            "settings": {"protocol": args.protocol, "method": cfg.method, "backbone": cfg.backbone.name,
                         "weights": cfg.backbone.weights, "image_size": cfg.data.image_size, "crop": cfg.data.crop_size,
                         "layers": cfg.backbone.layers, "coreset_ratio": cfg.bank.coreset_ratio,
                         "b": cfg.bank.num_neighbors, "seed": cfg.seed, "threads": torch.get_num_threads(),
                         "machine": f"{platform.machine()} {platform.processor() or ''} cpus={__import__('os').cpu_count()}".strip()},
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }), flush=True)
    write_results(results, out / args.protocol / "results.json", args.md)
    print(markdown_table(results))


if __name__ == "__main__":
    main()
