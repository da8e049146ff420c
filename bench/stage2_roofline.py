"""How close one stage-II step runs to what the machine can do: the step's floating-point work
(counted per convolution and matrix product of F, D and C, forward and backward), this machine's
sustained matrix-product rate in the step's precision, and the step time measured with the
trainer as configured (and the allocator setting every training process applies).

    python bench/stage2_roofline.py                       # defaults: Lite0, 224 px, batch 16, all threads
    python bench/stage2_roofline.py --data DATA_ROOT/mvtec_ad --category bottle --steps 6
    python bench/stage2_roofline.py --set stage2.trainable_from=blocks.2 --device cuda

The work is counted from the modules' shapes (2 FLOPs per multiply-add; the backward pass counts
the input gradient where the input needs one and the weight gradient where the weight trains:
F's stem takes no input gradient, D's frozen weights none). Elementwise work (activations, losses,
the optimizer) is left out, so ``bound_step_s`` = counted GFLOP / the best matrix-product rate is
a floor no implementation of the same step reaches on this machine: ``efficiency`` is the
fraction of that floor the measured step achieves. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype = torch.float32, sizes=(1024, 2048, 3072),
                repeats: int = 5) -> dict:
    """Best sustained GFLOP/s of square matrix products in the step's precision (``compute.precision``;
    TF32 off for fp32, as the step runs)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        sizes = (4096, 8192)
    best = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        t = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        times = [time.perf_counter() - t]
        if times[0] > 2.0:  # a precision this device emulates: one timing, no larger sizes
            best[n] = 2 * n ** 3 / times[0] / 1e9
            break
        for _ in range(repeats):
            t = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            times.append(time.perf_counter() - t)
        best[n] = 2 * n ** 3 / min(times) / 1e9
    return {"by_size_gflop_s": {str(k): round(v, 1) for k, v in best.items()}, "best_gflop_s": round(max(best.values()), 1)}


def count_work(trainer, batch) -> dict:
    """GFLOP of one step by part (F, D, C) and kind (dense, depthwise, linear), forward/backward."""
    acc: dict[tuple[str, str], list[float]] = {}

    def hook(part):
        def h(m, inputs, out):
            x = inputs[0]
            if isinstance(m, torch.nn.Conv2d):
                macs = out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
                kind = "depthwise" if m.groups > 1 else "conv"
            else:
                macs = out.numel() * m.in_features
                kind = "linear"
            grads = int(m.weight.requires_grad) + int(x.requires_grad)
            f = acc.setdefault((part, kind), [0.0, 0.0])
            f[0] += 2 * macs
            f[1] += 2 * macs * grads
        return h

    handles = []
    parts = {"F": trainer.extractor, "C": trainer.head}
    if trainer.discriminator is not None:
        parts["D"] = trainer.discriminator
    for part, mod in parts.items():
        for m in mod.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                handles.append(m.register_forward_hook(hook(part)))
    trainer.losses(batch)  # a forward pass with the training step's requires_grad flags; not stepped
    for h in handles:
        h.remove()
    by = {f"{p}/{k}": {"forward_gflop": round(v[0] / 1e9, 2), "backward_gflop": round(v[1] / 1e9, 2)}
          for (p, k), v in sorted(acc.items())}
    return {"by_part": by, "total_gflop": round(sum(v[0] + v[1] for v in acc.values()) / 1e9, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=None, help="YAML config (default: the library's defaults)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (YAML value), repeatable")
    ap.add_argument("--data", default=None, help="dataset root (with --category): real training images")
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=6, help="timed steps (after 2 untimed)")
    args = ap.parse_args()

    from tocoad_ray.commands.args import overrides
    from tocoad_ray.config import load_config
    from tocoad_ray.data import Preprocess, load_split
    from tocoad_ray.data.image_io import read_image
    from tocoad_ray.models.discriminator import Discriminator
    from tocoad_ray.synth import AnomalyGenerator
    from tocoad_ray.train import Stage2Trainer, build_extractor, make_stage2_batch
    from tocoad_ray.train.allocator import keep_freed_memory
    from tocoad_ray.train.views import view_augment

    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as every training process sets it (train/allocator.py)
    device = torch.device(args.device)
    cfg = load_config(args.config, overrides(args.set))
    size, b = cfg.data.input_size, cfg.stage2.batch_size
    ex = build_extractor(cfg)
    trainer = Stage2Trainer(cfg, ex, device, discriminator=Discriminator(ex.channels, ex.reductions))
    if args.data:
        imgs = [read_image(s.path) for s in load_split(args.data, args.category, "mvtec").train[:b]]
    else:  # the work and the time do not depend on what the pixels show
        imgs = [np.random.default_rng(i).integers(0, 256, (size + 32, size + 32, 3), dtype=np.uint8) for i in range(b)]
    imgs = (imgs * b)[:b]
    batch = make_stage2_batch(imgs, Preprocess(cfg.data, ex.mean, ex.std), np.random.default_rng(cfg.seed),
                              num_views=cfg.stage2.num_views, augment=view_augment(cfg, size),
                              generator=AnomalyGenerator.from_config(cfg.generator))

    work = count_work(trainer, batch)
    times = []
    for i in range(args.steps + 2):
        sync(device)
        t = time.perf_counter()
        trainer.train_step(batch)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t)
    step = statistics.median(times)
    rate = matmul_rate(device, trainer.compute.dtype or torch.float32)
    bound = work["total_gflop"] / rate["best_gflop_s"]
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(json.dumps({
        "commit": commit, "device": str(device), "threads": torch.get_num_threads(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
        "batch": b, "input_size": size, "views": cfg.stage2.num_views, "compute": vars(cfg.compute),
        "trainable_from": cfg.stage2.trainable_from, "images": "real" if args.data else "random",
        "work": work, "matmul": rate,
        "step_s": {"median": round(step, 3), "min": round(min(times), 3), "max": round(max(times), 3)},
        "achieved_gflop_s": round(work["total_gflop"] / step, 1),
        "bound_step_s": round(bound, 3), "efficiency": round(bound / step, 3),
        "images_per_s": {"measured_step": round(b / step, 2), "bound": round(b / bound, 2)},
    }, indent=1))


if __name__ == "__main__":
    main()
