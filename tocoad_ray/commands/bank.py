"""``tocoad bank``: operator feedback into an artifact's memory bank, its versions, rollback."""
from __future__ import annotations

import argparse
import json

from . import args as A


def add_parser(sub) -> None:
    p = A.add_command(sub, "bank", "grow an artifact's memory bank with images marked normal; versions, rollback",
                      "Images an operator marked normal join the bank as a new artifact version (no "
                      "retraining); older versions are kept and rollback makes one current again. "
                      "The scoring service picks the current version up by itself.")
    bs = p.add_subparsers(dest="bank_command", metavar="{add,versions,rollback}", required=True)

    a = A.add_command(bs, "add", "add images marked normal to the bank (a new version)")
    a.add_argument("--artifact", required=True, metavar="DIR", help="artifact folder written by fit or train-all")
    a.add_argument("--force", action="store_true",
                   help="add images even when they score above bank.refuse_factor x threshold")
    a.add_argument("--max-bank-size", type=int, metavar="N",
                   help="bank rows at most, past it a coreset is re-selected (default: the artifact's "
                        "bank.max_size; 0 there: twice the fitted bank)")
    a.add_argument("images", nargs="+", metavar="IMAGE", help="image files an operator checked as normal")
    A.add_verbosity(a)
    a.set_defaults(func=run_add)

    v = A.add_command(bs, "versions", "list the artifact's versions (which one is current, what each added)")
    v.add_argument("--artifact", required=True, metavar="DIR", help="artifact folder written by fit or train-all")
    v.add_argument("--json", action="store_true", help="print JSON instead of a table")
    v.set_defaults(func=run_versions)

    r = A.add_command(bs, "rollback", "make an earlier (or later) version current again")
    r.add_argument("--artifact", required=True, metavar="DIR", help="artifact folder written by fit or train-all")
    r.add_argument("--version", required=True, metavar="V", help="version number (1 = the fit), e.g. 2 or v2")
    r.set_defaults(func=run_rollback)


def run_add(args: argparse.Namespace) -> int:
    from ..bank.feedback import add_normal_images

    res = add_normal_images(args.artifact, args.images, force=args.force, max_size=args.max_bank_size)
    if not res["written"]:
        print(f"nothing added: every image is already in the bank (version {res['version']} stays current)")
        return 0
    for a in res["added"]:
        print(f"{a['name']}: score {a['score_before']:.4g} -> {a['score_after']:.4g} (held out {a['held_out_score']:.4g}), "
              f"{a['rows_added']} bank row(s)" + (" [forced]" if a["forced"] else ""))
    for s in res["skipped"]:
        print(f"{s['name']}: skipped, {s['reason']}")
    print(f"version {res['version']} is current (was {res['previous_version']}): bank {res['previous_bank_size']} -> "
          f"{res['bank_size']} rows{' (coreset re-selected)' if res['reselected'] else ''}, threshold "
          f"{res['previous_threshold']:.4g} -> {res['threshold']:.4g}")
    return 0


def run_versions(args: argparse.Namespace) -> int:
    from ..artifact_versions import list_versions

    rows = list_versions(args.artifact)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'':2}{'version':>7}  {'created':<24} {'bank':>7} {'threshold':>10}  added")
    for r in rows:
        added = ", ".join(a["name"] for a in r["added"]) + (" (re-selected)" if r["reselected"] else "")
        print(f"{'*' if r['current'] else ' ':2}{r['version']:>7}  {str(r['created']):<24} {r['bank_size']:>7} "
              f"{r['threshold']:>10.4g}  {added or '-'}")
    return 0


def parse_version(text: str) -> int:
    from ..errors import ConfigError

    t = str(text).strip().lower().removeprefix("v")
    if not t.isdigit() or int(t) < 1:
        raise ConfigError(f"--version expects a version number such as 2 or v2, got {text!r}")
    return int(t)


def run_rollback(args: argparse.Namespace) -> int:
    from ..artifact_versions import rollback

    res = rollback(args.artifact, parse_version(args.version))
    print(f"version {res['version']} is current (was {res['previous_version']})")
    return 0
