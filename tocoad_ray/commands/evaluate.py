"""``tocoad evaluate``: score a category's test split with an artifact."""
from __future__ import annotations

import argparse
import json

from ..names import SEARCHES
from . import args as A


def add_parser(sub) -> None:
    p = A.add_command(sub, "evaluate", "score the test split: image/pixel AUROC, AUPRO, F1-max")
    p.add_argument("--artifact", required=True, metavar="DIR", help="artifact folder written by fit or train-all")
    A.add_data(p)
    p.add_argument("--category", required=True, help="category folder under --data (elpv: mono or poly)")
    p.add_argument("--json", metavar="FILE", help="also write the metrics to this JSON file")
    p.add_argument("--bank-search", choices=SEARCHES,
                   help="nearest-neighbour search for this run (default: the artifact's bank.search)")
    A.add_verbosity(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..artifact import atomic_write_bytes
    from ..pipeline import evaluate
    from ..report import markdown_table

    layout = A.layout_override(args).get("data.layout")
    res = evaluate(args.artifact, A.data_root(args), args.category, layout=layout, progress=not args.quiet,
                   search=args.bank_search)
    if args.json:
        atomic_write_bytes(args.json, json.dumps(res, indent=2).encode())
    print(markdown_table({args.category: res}))
    print(json.dumps(res))
    return 0
