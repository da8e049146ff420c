"""``tocoad export``: one ONNX / OpenVINO / TorchScript model with the memory bank inside."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import args as A


def add_parser(sub) -> None:
    p = A.add_command(sub, "export", "one ONNX / OpenVINO / TorchScript model with the memory bank inside")
    p.add_argument("--artifact", required=True, metavar="DIR", help="artifact folder to export")
    p.add_argument("--format", choices=["onnx", "openvino", "torchscript"], default="onnx", help="model format")
    p.add_argument("--out", required=True, metavar="FILE", help="model file: .onnx, .xml (+ .bin beside it) or .pt")
    p.add_argument("--chunk", type=int, default=8192, help="bank rows per distance block in the graph")
    A.add_verbosity(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..export.exporter import export_artifact

    meta = export_artifact(args.artifact, args.format, args.out, chunk=args.chunk)
    size = Path(args.out).stat().st_size + (Path(args.out).with_suffix(".bin").stat().st_size
                                            if args.format == "openvino" else 0)
    print(f"wrote {args.out} ({args.format}, {size / 1e6:.1f} MB): {meta['method']}, {meta['bank_format']} bank "
          f"{meta['bank_size']}×{meta['feature_dim']}, input [batch, 3, {meta['input_size']}, {meta['input_size']}] "
          f"preprocessed, threshold {meta['threshold']:.4f}")
    return 0
