"""Exported model (tocoad export) against the torch path: speed, file size, peak memory, equality.

    python bench/export.py                                   # bottle, the default config (256 → 224)
    python bench/export.py --category mvtec_ad/bottle --threads 2 --repeats 5

Fits (or reuses) a PatchCore artifact per bank format (float32, sq8), exports each to ONNX and
OpenVINO IR, and scores the same preprocessed test images with ``Detector.score`` (torch + faiss),
ONNX Runtime and OpenVINO, each in its own process so ``peak_rss_mb`` is that runtime's own peak
(load + scoring at batch 16). ms/image excludes decoding and preprocessing (the same for all),
median over ``--repeats``; one JSON line per measurement, then a summary line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _ms(fn, batches: list[np.ndarray], repeats: int) -> float:
    fn(batches[0])  # warm-up: first-call allocations and graph compilation stay out of the figure
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for b in batches:
            fn(b)
        times.append(time.perf_counter() - t)
    return 1000.0 * statistics.median(times) / sum(len(b) for b in batches)


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: reset by exec, unlike ru_maxrss, which keeps the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(args: argparse.Namespace) -> dict:
    """One runtime in a fresh process: load, time batch 1 and 16, peak RSS, the scores."""
    x = np.load(args.inputs)
    t = time.perf_counter()
    if args.worker == "torch":
        import torch

        from tocoad_ray.pipeline import load_detector

        torch.set_num_threads(args.threads)
        det = load_detector(args.model, device="cpu")
        score = lambda b: det.score(torch.from_numpy(b))  # noqa: E731
    else:
        from tocoad_ray.export.runtime import EdgeModel

        em = EdgeModel(args.model, runtime=args.worker, threads=args.threads)
        score = em.score
    load_s = time.perf_counter() - t
    scores = np.concatenate([score(x[i: i + 16])[0] for i in range(0, len(x), 16)])
    n1 = min(len(x), 8)
    res = {
        "load_s": load_s,
        "ms_per_image_b1": _ms(score, [x[i: i + 1] for i in range(n1)], args.repeats),
        "ms_per_image_b16": _ms(score, [x[:16]], args.repeats),
        "peak_rss_mb": _peak_rss_mb(),
        "scores": scores.tolist(),
    }
    if args.worker == "torch":
        res["torch_threads"] = torch.get_num_threads()
    res["heavy_modules"] = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "ray", "faiss", "timm"})
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--category", default="mvtec_ad/bottle")
    ap.add_argument("--config", help="fit config (default: the library's, 256 → 224, coreset 10 %%)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-export"))
    ap.add_argument("--images", type=int, default=32, help="test images scored")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--worker", choices=["torch", "onnxruntime", "openvino"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    from tocoad_ray.artifact import ArtifactError, read_meta
    from tocoad_ray.config import load_config
    from tocoad_ray.data import load_split, read_image
    from tocoad_ray.export.exporter import export_artifact
    from tocoad_ray.export.preprocess import ImagePreprocess
    from tocoad_ray.pipeline import fit

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root, name = (Path(args.data) / args.category).parent, (Path(args.data) / args.category).name
    rows = []
    for fmt in ("float32", "sq8"):
        art = out / f"{name}-{fmt}"
        try:
            read_meta(art)
        except ArtifactError:
            fit(load_config(args.config, {"method": "patchcore", "bank.storage": fmt}), root, name, art, progress=False, log=lambda m: None)
        meta = read_meta(art)
        files = {"onnx": out / f"{name}-{fmt}.onnx", "openvino": out / f"{name}-{fmt}.xml"}
        export_s = {}
        for kind, path in files.items():
            t = time.perf_counter()
            export_artifact(art, kind, path)
            export_s[kind] = time.perf_counter() - t
        test = load_split(root, name, meta["config"]["data"]["layout"]).test
        pick = np.linspace(0, len(test) - 1, min(args.images, len(test))).round().astype(int)
        pre = ImagePreprocess(meta["config"]["data"]["image_size"], meta["config"]["data"]["crop_size"],
                              meta["config"]["data"]["keep_aspect"], meta["backbone"]["mean"], meta["backbone"]["std"])
        inputs = out / f"{name}-inputs.npy"
        np.save(inputs, np.stack([pre(read_image(test[i].path)) for i in pick]))
        ref = None
        for runtime, model in (("torch", art), ("onnxruntime", files["onnx"]), ("openvino", files["openvino"])):
            cmd = [sys.executable, __file__, "--worker", runtime, "--model", str(model), "--inputs", str(inputs),
                   "--threads", str(args.threads), "--repeats", str(args.repeats)]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            scores = np.asarray(res.pop("scores"))
            ref = scores if runtime == "torch" else ref
            size = (Path(model).stat().st_size + Path(model).with_suffix(".bin").stat().st_size if runtime == "openvino"
                    else Path(model).stat().st_size if runtime == "onnxruntime"
                    else sum((art / f).stat().st_size for f in ("bank.safetensors", "meta.json", "config.yaml")))
            row = {"category": args.category, "bank_format": fmt, "runtime": runtime, "threads": args.threads,
                   "bank_size": meta["bank_size"], "input_size": meta["input_size"], "n_images": len(pick),
                   **{k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()},
                   "file_mb": round(size / 1e6, 2),
                   "export_s": round(export_s.get("onnx" if runtime == "onnxruntime" else runtime, 0.0), 2),
                   "max_rel_score_diff_vs_torch": float(np.abs(scores / ref - 1.0).max())}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({"summary": [{k: r[k] for k in ("bank_format", "runtime", "ms_per_image_b1", "ms_per_image_b16",
                                                     "peak_rss_mb", "file_mb", "max_rel_score_diff_vs_torch")}
                                  for r in rows],
                      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                  "processor": platform.processor(), "threads": args.threads}}))


if __name__ == "__main__":
    main()
