"""``tocoad predict``: score image files with an artifact or an exported model; heatmap overlays."""
from __future__ import annotations

import argparse

from ..errors import ConfigError
from . import args as A


def add_parser(sub) -> None:
    p = A.add_command(sub, "predict", "score images, write heatmap overlays")
    p.add_argument("images", nargs="+", help="image files to score")
    p.add_argument("--artifact", metavar="DIR", help="artifact folder (scored with torch + faiss)")
    p.add_argument("--model", metavar="FILE",
                   help="exported .onnx / OpenVINO .xml model (scored with ONNX Runtime or OpenVINO)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the heatmap overlays")
    p.add_argument("--threshold", type=float, help="verdict threshold (default: the artifact's)")
    p.add_argument("--runtime", choices=["auto", "onnxruntime", "openvino"], default="auto",
                   help="with --model: auto = onnxruntime for .onnx, openvino for .xml")
    p.add_argument("--threads", type=int, help="with --model: CPU threads (default: all cores)")
    A.add_verbosity(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if (args.artifact is None) == (args.model is None):
        raise ConfigError("give exactly one of --artifact DIR (torch) or --model FILE (an exported model)")
    if args.model is not None:
        from ..export.runtime import predict as predict_model

        results = predict_model(args.model, args.images, args.out, threshold=args.threshold, runtime=args.runtime,
                                threads=args.threads)
    else:
        from ..pipeline import predict

        results = predict(args.artifact, args.images, args.out, threshold=args.threshold)
    for r in results:
        verdict = "ANOMALOUS" if r["anomalous"] else "normal"
        print(f"{r['image']}: score {r['score']:.4f} (threshold {r['threshold']:.4f}) {verdict} → {r['heatmap']}")
    return 0
