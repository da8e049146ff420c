"""Throughput of each anomaly generator G on real MVTec bottle images (single process).

Usage: python bench/synth.py [--n 200] [--size 256] [--data DIR]
Prints one JSON line per generator.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import time

import numpy as np
from PIL import Image

from tocoad_ray.synth import GENERATORS, AnomalyGenerator


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="/work/shared/data/mvtec_ad/bottle/train/good")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--normal-prob", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    files = sorted(glob.glob(os.path.join(a.data, "*.png")) + glob.glob(os.path.join(a.data, "*.jpg")))[:16]
    if not files:
        raise SystemExit(f"no images in {a.data}")
    imgs = [np.asarray(Image.open(f).convert("RGB").resize((a.size, a.size), Image.BILINEAR)) for f in files]
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    for kind in GENERATORS:
        gen = AnomalyGenerator(kind, normal_prob=a.normal_prob, other_images=imgs if kind == "nsa" else None)
        rng = np.random.default_rng(a.seed)
        gen(imgs[0], rng)  # warm-up
        n_anom = 0
        t0 = time.perf_counter()
        for i in range(a.n):
            _, m = gen(imgs[i % len(imgs)], rng)
            n_anom += bool(m.any())
        dt = time.perf_counter() - t0
        print(json.dumps({"generator": kind, "image_size": [a.size, a.size], "n": a.n,
                          "normal_prob": a.normal_prob, "anomalous": n_anom,
                          "textures": "procedural" if kind == "perlin" else None,
                          "seconds": round(dt, 3), "images_per_second": round(a.n / dt, 1),
                          "threads": 1, "omp_num_threads": threads, "cpu_count": os.cpu_count()}),
              flush=True)


if __name__ == "__main__":
    main()
