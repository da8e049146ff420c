"""``tocoad synth``: a grid PNG of generator G's synthetic anomalies with their masks."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import args as A


def add_parser(sub) -> None:
    p = A.add_command(sub, "synth", "write a grid PNG of generator G's samples with their masks")
    A.add_data(p)
    p.add_argument("--category", required=True, help="category folder under --data (elpv: mono or poly)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the PNG")
    p.add_argument("--kind", choices=["perlin", "cutpaste", "cutpaste_scar", "nsa"],
                   help="anomaly kind (default: the config's generator.kind)")
    p.add_argument("--n", type=int, default=16, help="samples in the grid")
    p.add_argument("--cols", type=int, default=8, help="grid columns")
    p.add_argument("--with-normal", action="store_true", help="keep G's ~50 %% normal samples in the grid")
    A.add_config(p, method=False)
    A.add_verbosity(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..data import load_split, read_image
    from ..synth import AnomalyGenerator, save_grid

    cfg = A.load(args)
    split = load_split(A.data_root(args), args.category, cfg.data.layout)
    g = cfg.generator
    gen = AnomalyGenerator(args.kind or g.kind, texture_dir=g.texture_dir,
                           normal_prob=0.0 if not args.with_normal else g.normal_prob, rotate=g.rotate)
    rng = np.random.default_rng(cfg.seed)
    pick = rng.choice(len(split.train), size=min(args.n, len(split.train)), replace=len(split.train) < args.n)
    samples = [gen(read_image(split.train[i].path), rng) for i in pick]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = save_grid(samples, out / f"synth_{args.category}_{args.kind or g.kind}.png", cols=args.cols)
    print(f"wrote {path}")
    return 0
