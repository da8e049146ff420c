"""``tocoad`` command line: fit, evaluate, predict, run, synth (no cluster needed); serve and train-all (Ray)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .artifact import ArtifactError, atomic_write_bytes
from .config import ConfigError, load_config
from .data import DataError
from .distributed.storage import StorageError
from .models.weights import WeightsError


def _overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``--set bank.coreset_ratio=0.01`` → {"bank.coreset_ratio": 0.01} (values parsed as YAML)."""
    import yaml

    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise ConfigError(f"--set expects KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (defaults: the paper's)")
    p.add_argument("--method", choices=["patchcore", "tocoad", "reconpatch"], help="overrides the config's method")
    p.add_argument("--layout", choices=["mvtec", "visa", "btad", "folder", "elpv"], help="data set layout")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. bank.coreset_ratio=0.05")


def _config(args: argparse.Namespace):
    ov = _overrides(args.set)
    if args.method:
        ov["method"] = args.method
    if getattr(args, "layout", None):
        ov["data.layout"] = args.layout
    return load_config(args.config, ov)


def cmd_fit(args: argparse.Namespace) -> int:
    from .pipeline import fit

    cfg = _config(args)
    fit(cfg, args.data, args.category, args.out, resume=args.resume, progress=not args.quiet)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .pipeline import evaluate
    from .report import markdown_table

    res = evaluate(args.artifact, args.data, args.category, layout=args.layout, progress=not args.quiet,
                   search=args.search)
    if args.json:
        atomic_write_bytes(args.json, json.dumps(res, indent=2).encode())
    print(markdown_table({args.category: res}))
    print(json.dumps(res))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    if (args.artifact is None) == (args.model is None):
        raise ValueError("give exactly one of --artifact DIR (torch) or --model FILE (an exported model)")
    if args.model is not None:
        from .export.runtime import predict as predict_model

        results = predict_model(args.model, args.images, args.out, threshold=args.threshold, runtime=args.runtime,
                                threads=args.threads)
    else:
        from .pipeline import predict

        results = predict(args.artifact, args.images, args.out, threshold=args.threshold)
    for r in results:
        verdict = "ANOMALOUS" if r["anomalous"] else "normal"
        print(f"{r['image']}: score {r['score']:.4f} (threshold {r['threshold']:.4f}) {verdict} → {r['heatmap']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export.exporter import export_artifact

    meta = export_artifact(args.artifact, args.format, args.out, chunk=args.chunk)
    size = Path(args.out).stat().st_size + (Path(args.out).with_suffix(".bin").stat().st_size
                                            if args.format == "openvino" else 0)
    print(f"wrote {args.out} ({args.format}, {size / 1e6:.1f} MB): {meta['method']}, {meta['bank_format']} bank "
          f"{meta['bank_size']}×{meta['feature_dim']}, input [batch, 3, {meta['input_size']}, {meta['input_size']}] "
          f"preprocessed, threshold {meta['threshold']:.4f}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The main job: fit + evaluate every category, then a results table (JSON + Markdown)."""
    from .pipeline import evaluate, fit
    from .report import markdown_table, write_results

    cfg = _config(args)
    out = Path(args.out)
    results = {}
    for cat in args.categories.split(","):
        art = out / cat
        fit(cfg, args.data, cat, art, progress=not args.quiet)
        results[cat] = evaluate(art, args.data, cat, layout=cfg.data.layout, progress=not args.quiet)
        print(json.dumps({"category": cat, **results[cat]}))
    write_results(results, out / "results.json", out / "results.md")
    print(markdown_table(results))
    print(f"results: {out / 'results.json'}, {out / 'results.md'}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    import numpy as np

    from .data import load_split, read_image
    from .synth import AnomalyGenerator, save_grid

    cfg = _config(args)
    split = load_split(args.data, args.category, cfg.data.layout)
    g = cfg.generator
    gen = AnomalyGenerator(args.kind or g.kind, texture_dir=g.texture_dir, normal_prob=0.0 if not args.with_normal else g.normal_prob,
                           rotate=g.rotate)
    rng = np.random.default_rng(cfg.seed)
    pick = rng.choice(len(split.train), size=min(args.n, len(split.train)), replace=len(split.train) < args.n)
    samples = [gen(read_image(split.train[i].path), rng) for i in pick]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = save_grid(samples, out / f"synth_{args.category}_{args.kind or g.kind}.png", cols=args.cols)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tocoad", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="train (per method) and build the memory bank artifact")
    p.add_argument("--data", required=True, help="data root (e.g. ../shared/data/mvtec_ad); ignored for elpv")
    p.add_argument("--category", required=True)
    p.add_argument("--out", required=True, help="artifact directory")
    p.add_argument("--resume", action="store_true", help="continue training from the last checkpoint")
    p.add_argument("--quiet", action="store_true")
    _add_config_args(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("evaluate", help="score the test split; image/pixel AUROC, AUPRO, F1-max")
    p.add_argument("--artifact", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--layout", choices=["mvtec", "visa", "btad", "folder", "elpv"])
    p.add_argument("--json", help="write the metrics here")
    p.add_argument("--search", choices=["exact", "ivf"], help="override the artifact's bank.search")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="score images, write heatmap overlays")
    p.add_argument("--artifact", help="artifact directory (scored with torch + faiss)")
    p.add_argument("--model", help="exported .onnx / OpenVINO .xml model (scored with ONNX Runtime or OpenVINO)")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--threshold", type=float, help="override the artifact's threshold")
    p.add_argument("--runtime", choices=["auto", "onnxruntime", "openvino"], default="auto",
                   help="with --model: auto = onnxruntime for .onnx, openvino for .xml")
    p.add_argument("--threads", type=int, help="with --model: CPU threads (default: all cores)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="one ONNX / OpenVINO / TorchScript model with the memory bank inside")
    p.add_argument("--artifact", required=True)
    p.add_argument("--format", choices=["onnx", "openvino", "torchscript"], default="onnx")
    p.add_argument("--out", required=True, help="model file: .onnx, .xml (+ .bin beside it) or .pt")
    p.add_argument("--chunk", type=int, default=8192, help="bank rows per distance block in the graph")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="main job: fit + evaluate categories, results table")
    p.add_argument("--data", default="-", help="data root (default: the elpv solar cells shipped on PyPI)")
    p.add_argument("--categories", default="mono", help="comma-separated categories")
    p.add_argument("--out", default="runs/main")
    p.add_argument("--quiet", action="store_true")
    _add_config_args(p)
    p.set_defaults(func=cmd_run, layout_default="elpv")

    p = sub.add_parser("synth", help="write a grid PNG of generator G's samples with their masks")
    p.add_argument("--data", required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--kind", choices=["perlin", "cutpaste", "cutpaste_scar", "nsa"])
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--cols", type=int, default=8)
    p.add_argument("--with-normal", action="store_true", help="keep G's ~50 %% normal samples in the grid")
    _add_config_args(p)
    p.set_defaults(func=cmd_synth)

    from serve.cli import add_serve_parser
    add_serve_parser(sub)

    from jobs.train_all import add_parser as add_train_all_parser
    add_train_all_parser(sub)
    from jobs.tune import add_parser as add_tune_parser
    add_tune_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run" and not args.layout and args.data == "-":
        args.layout = "elpv"
    try:
        return args.func(args)
    except (ConfigError, DataError, ArtifactError, WeightsError, StorageError, FileNotFoundError, ValueError) as e:
        print(f"tocoad {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
