"""Training throughput: ToCoAD stage I and stage II through the Ray pipeline (Ray Data samples →
TorchTrainer, 1 and 2 DDP workers) versus the plain single-process loop (``train_tocoad``), same
machine, same settings, one run; then ``train-all`` wall time for several categories one at a time
versus concurrently.

Images/second counts training rows (stage I: G's samples; stage II: normal images, each giving M
views and a G sample) per second of steady-state epochs: the first epoch of every run is dropped
(process start-up, imports, first Ray Data execution), the rest are summed. The Ray figures come
from the workers' own epoch timers (data waiting included); TorchTrainer start-up is reported
separately. Ray runs: one worker with all ``--threads`` torch threads (like the plain loop), one
worker with one thread less (the Ray Data task that makes the samples gets that core), and two
workers with half each.

Each path runs once per setting of ``--settings`` (default: ``before``, how the trainers ran until
the ``compute`` section: NCHW, unfolded BatchNorm, separate activations, samples made at the
training's priority; and ``after``, the defaults), interleaved
path by path so that drift of the machine's speed hits both alike; the summary gives each path's
after/before ratio.

Usage: python bench/train_throughput.py [--data DATA_ROOT/mvtec_ad --category bottle]
           [--epochs 4 --steps 3 --batch 16] [--settings "before:compute.channels_last=false,...;after:"]
           [--skip-train-all] [--train-all-categories ...]
Prints one JSON object per measurement and a summary.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402

from tocoad_ray.config import load_config  # noqa: E402
from tocoad_ray.data import load_split  # noqa: E402

HERE = Path(__file__).resolve().parents[1]


def steady(history: list[dict], batch: int) -> dict:
    rows = history[1:] or history
    images = sum(h["steps"] * batch for h in rows)
    seconds = sum(h["seconds"] for h in rows)
    return {"images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 3),
            # per-epoch mean loss, to compare settings (the same computation up to float rounding)
            "loss_by_epoch": [round(float(h["losses"]["loss"]), 5) for h in history]}


def plain(cfg, paths, workdir: Path) -> dict:
    from tocoad_ray.train import train_tocoad

    t = time.perf_counter()
    train_tocoad(cfg, paths, workdir, device="cpu", progress=False, log=lambda m: None)
    wall = time.perf_counter() - t
    log = [json.loads(l) for l in (workdir / "train_log.jsonl").read_text().splitlines()]
    return {"wall_s": round(wall, 1),
            "stage1": steady([h for h in log if h["stage"] == "stage1"], cfg.stage1.batch_size),
            "stage2": steady([h for h in log if h["stage"] == "stage2"], cfg.stage2.batch_size)}


def ray_pipeline(cfg, paths, storage: Path) -> dict:
    from tocoad_ray.distributed.samples import SampleSpec, decode_images, image_store
    from tocoad_ray.distributed.stages import run_stages
    from tocoad_ray.models.backbone import FeatureExtractor

    ex = FeatureExtractor(cfg.backbone.name, cfg.backbone.layers, cfg.backbone.weights)
    t = time.perf_counter()
    store = image_store(decode_images(paths, cfg, ex.mean, ex.std, cfg.distributed.data_cpus), len(paths))
    decode_s = time.perf_counter() - t
    # both stages in one worker group, as train-all runs them
    res = run_stages(cfg, [1, 2], "bench", store, len(paths),
                     {s: SampleSpec.build(cfg, s, ex.mean, ex.std) for s in (1, 2)}, str(storage))
    out = {"decode_s": round(decode_s, 1), "run_wall_s": round(res[2].run_seconds, 1),
           "startup_s": round(res[2].run_seconds - res[1].seconds - res[2].seconds, 1)}
    for name, r, b in (("stage1", res[1], cfg.stage1.batch_size), ("stage2", res[2], cfg.stage2.batch_size)):
        out[name] = steady(r.history, b)
    return out


def train_all_wall(cats: list[tuple[str, str]], overrides: dict, concurrent: bool, tmp: Path) -> dict:
    """``train-all`` over (data_root, category) pairs: one run with all at once, or one at a time."""
    import ray

    from jobs.train_all import run

    ray.shutdown()  # each mode on a local instance that train-all sizes for its concurrency
    cfg = load_config(None, {**overrides, "distributed.max_concurrent_categories": 0 if concurrent else 1})
    # categories live under different roots: link them side by side under one root
    root = tmp / "root"
    root.mkdir(exist_ok=True)
    for data, cat in cats:
        if not (root / cat).exists():
            (root / cat).symlink_to(Path(data).resolve() / cat)
    out = tmp / ("concurrent" if concurrent else "sequential")
    t = time.perf_counter()
    rep = run(cfg, str(root), [c for _, c in cats], out, interval_s=30, echo=lambda m: None)
    wall = time.perf_counter() - t
    return {"mode": "concurrent" if concurrent else "one at a time", "wall_s": round(wall, 1),
            "per_category_total_s": {c: round(r.get("timings", {}).get("total_s", float("nan")), 1)
                                     for c, r in rep["categories"].items()},
            "image_auroc": {c: r.get("metrics", {}).get("image_auroc") for c, r in rep["categories"].items()},
            "status": {c: r["status"] for c, r in rep["categories"].items()},
            "errors": {c: r["error"] for c, r in rep["categories"].items() if r["status"] != "ok"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(HERE.parent / "shared" / "data" / "mvtec_ad"))
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--settings", default=DEFAULT_SETTINGS,
                    help="';'-separated LABEL:KEY=VALUE,... config overrides, each measured on every path")
    ap.add_argument("--skip-train-all", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true", help="only the train-all wall times")
    ap.add_argument("--train-all-categories", default="mvtec_ad/bottle,mpdd/metal_plate,magnetic_tile/mt")
    args = ap.parse_args()

    import ray

    torch.set_num_threads(args.threads)
    ov = {"method": "tocoad", "stage1.epochs": args.epochs, "stage1.max_steps_per_epoch": args.steps,
          "stage1.batch_size": args.batch, "stage2.epochs": args.epochs, "stage2.max_steps_per_epoch": args.steps,
          "stage2.batch_size": args.batch, "distributed.data_tasks": 1}
    cfg = load_config(None, ov)
    paths = [s.path for s in load_split(args.data, args.category, "mvtec").train]
    settings = {"category": args.category, "images": len(paths), "input_size": cfg.data.input_size,
                "batch": args.batch, "epochs": args.epochs, "steps_per_epoch": args.steps, "threads": args.threads,
                "backbone": cfg.backbone.name, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "torch": torch.__version__, "ray": ray.__version__}
    print(json.dumps({"settings": settings}), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="train_throughput_"))
    summary: dict = {}
    try:
        if not args.skip_throughput:
            summary.update(throughput(args, ov, cfg, paths, tmp))
        if not args.skip_train_all:
            ray.shutdown()  # a fresh instance, sized by train-all itself
            cats = [(str(HERE.parent / "shared" / "data" / c.split("/")[0]), c.split("/")[1])
                    for c in args.train_all_categories.split(",")]
            ta = {"method": "tocoad", "stage1.epochs": 1, "stage1.max_steps_per_epoch": 2, "stage2.epochs": 1,
                  "stage2.max_steps_per_epoch": 1, "bank.coreset_ratio": 0.01, "distributed.num_workers": 2,
                  "distributed.data_tasks": 1, "distributed.baseline": False}
            for concurrent in (False, True):
                r = train_all_wall(cats, ta, concurrent, tmp)
                print(json.dumps({"train_all": r}), flush=True)
                summary[f"train_all_{'concurrent' if concurrent else 'sequential'}_s"] = r["wall_s"]
        print(json.dumps({"summary": summary}), flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


DEFAULT_SETTINGS = ("before:compute.channels_last=false,compute.fold_batchnorm=false,compute.fuse_activations=false,"
                    "compute.sample_niceness=0;after:")


def parse_settings(text: str) -> dict[str, dict]:
    """'before:a.b=1,c.d=false;after:' → {"before": {"a.b": 1, "c.d": False}, "after": {}} (YAML values)."""
    import yaml

    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        label, _, body = part.partition(":")
        out[label] = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in filter(None, body.split(",")))}
    return out


def throughput(args, ov: dict, cfg, paths, tmp: Path) -> dict:
    """Plain loop (as ``tocoad fit`` runs it: ``train_tocoad`` sets the workers' allocator setting
    too) and the Ray pipeline, each under every setting."""
    import ray

    settings = parse_settings(args.settings)
    results: dict[str, dict] = {}
    for label, extra in settings.items():
        key = f"{label}/plain"
        results[key] = plain(load_config(None, {**ov, **extra}), paths, tmp / key.replace("/", "_"))
        print(json.dumps({key: results[key]}), flush=True)
    ray.init(num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    # (workers, torch threads per worker): one worker with all threads like the plain loop, one
    # worker leaving a core to the Ray Data task that makes the samples, two workers
    runs = [(1, args.threads), (1, max(1, args.threads - 1)), (2, max(1, args.threads // 2))]
    for workers, threads in dict.fromkeys(runs):
        for label, extra in settings.items():
            c = load_config(None, {**ov, **extra, "distributed.num_workers": workers,
                                   "distributed.cpus_per_worker": threads})
            key = f"{label}/ray_{workers}w_{threads}t"
            results[key] = ray_pipeline(c, paths, tmp / key.replace("/", "_"))
            print(json.dumps({key: results[key]}), flush=True)
    summary = {f"{k}_{s}_images_per_s": results[k][s]["images_per_s"] for k in results for s in ("stage1", "stage2")}
    labels = list(settings)
    if len(labels) >= 2:  # the last setting against the first, per path
        first, last = labels[0], labels[-1]
        for k in results:
            if k.startswith(first + "/") and f"{last}/{k.split('/', 1)[1]}" in results:
                path = k.split("/", 1)[1]
                for s in ("stage1", "stage2"):
                    summary[f"{s}_{path}_{last}_vs_{first}"] = round(
                        results[f"{last}/{path}"][s]["images_per_s"] / results[k][s]["images_per_s"], 3)
    return summary


if __name__ == "__main__":
    main()
