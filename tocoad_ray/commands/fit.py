"""``tocoad fit``: train (per method) and build one category's memory-bank artifact."""
from __future__ import annotations

import argparse
import logging

from . import args as A

log = logging.getLogger("tocoad_ray.fit")


def add_parser(sub) -> None:
    p = A.add_command(sub, "fit", "train (per method) and build one category's memory-bank artifact")
    A.add_data(p)
    p.add_argument("--category", required=True, help="category folder under --data (elpv: mono or poly)")
    p.add_argument("--out", required=True, metavar="DIR", help="artifact folder to write")
    p.add_argument("--resume", action="store_true", help="continue training from the last checkpoint in --out")
    A.add_config(p)
    A.add_verbosity(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = A.load(args)
    if cfg.method == "tocoad":
        log.info("method tocoad: stage I %d epochs, stage II %d epochs, then the bank "
                 "(--method patchcore builds the frozen-F baseline without training)",
                 cfg.stage1.epochs if cfg.stage1.enabled else 0, cfg.stage2.epochs if cfg.stage2.enabled else 0)
    from ..pipeline import fit

    fit(cfg, A.data_root(args), args.category, args.out, resume=args.resume, progress=not args.quiet)
    return 0
