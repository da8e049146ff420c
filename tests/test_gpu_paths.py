"""Multi-worker code paths that only break on GPU clusters, checked with CPU process groups.

* The epoch metrics' all-reduce (``stages.mean_over_workers``) in the process group that
  ``stages.torch_config(gpu=True)`` gives the workers. nccl takes CUDA tensors only and cannot be
  created without a GPU, so a stand-in with nccl's device capability (a gloo group registered for
  "cuda" only) takes its place: a plain "nccl" group would have no backend for the CPU tensor.
* Stage II under DDP (``find_unused_parameters=False``, as ``ray.train.torch.prepare_model``) when
  ``backbone.stage2_layers`` stops before EfficientNet's last block: the blocks after it must not
  be waited for.

Both run two processes (``torch.multiprocessing.spawn``) without Ray. Also: ``bench/gpu_check.py``
without CUDA says so and exits 2.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tocoad_ray.config import Config, replace
from tocoad_ray.distributed.stages import mean_over_workers, torch_config

STUB_NCCL = "stubnccl"
WORLD = 2


def _init_group(rank: int, store_path: str, backend: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(backend, store=dist.FileStore(store_path, WORLD), rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))


def _spawn(fn, *args) -> None:
    mp.spawn(fn, args=args, nprocs=WORLD, join=True)


# --- the metrics all-reduce in the GPU process group ----------------------------------------------
def _stub_nccl(store, rank, size, timeout):
    """nccl as the process group sees it (a backend for CUDA tensors only), runnable without a GPU."""
    return dist.ProcessGroupGloo(store, rank, size, timeout)


def _mean_worker(rank: int, store_path: str, backend: str, out: str) -> None:
    dist.Backend.register_backend(STUB_NCCL, _stub_nccl, devices=["cuda"])
    _init_group(rank, store_path, backend.replace("nccl", STUB_NCCL))
    try:
        got = mean_over_workers({"loss": 1.0 + rank, "loss_sym": 4.0 * rank}, WORLD, torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(got))


def test_gpu_process_group_takes_the_cpu_metrics_all_reduce(tmp_path):
    gpu = torch_config(gpu=True).backend
    _spawn(_mean_worker, str(tmp_path / "store"), gpu, str(tmp_path))
    for rank in range(WORLD):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == {"loss": 1.5, "loss_sym": 2.0}

    # what init_process_group makes of the string: gloo for CPU tensors, nccl for CUDA ones
    parsed = dist.distributed_c10d.BackendConfig(dist.Backend(gpu)).get_device_backend_map()
    assert parsed == {"cpu": "gloo", "cuda": "nccl"}
    from ray.train.torch.config import _is_backend_nccl
    assert _is_backend_nccl(gpu)  # Ray still sets its NCCL error-handling env var for this group
    assert torch_config(gpu=False).backend == "gloo"


# --- stage II under DDP with stage2_layers short of the last block ---------------------------------
def _stage2_cfg(preserve: str) -> Config:
    cfg = Config(method="tocoad", seed=3)
    cfg.data = replace(cfg.data, image_size=64, crop_size=64)
    cfg.backbone = replace(cfg.backbone, weights="random", layers=["blocks.2", "blocks.4"],
                           stage2_layers=["blocks.2", "blocks.4"])
    cfg.stage2 = replace(cfg.stage2, batch_size=4, proj_dim=32, pred_hidden=8, preserve=preserve)
    return cfg


def _stage2_worker(rank: int, store_path: str, presets: list[str], paths: list[str], out: str) -> None:
    """Each ``stage2.preserve`` variant in turn in one process group (one spawn: processes cost
    seconds of imports each)."""
    _init_group(rank, store_path, "gloo")
    try:
        for preserve in presets:
            _stage2_variant(rank, _stage2_cfg(preserve), paths, Path(out, f"rank{rank}-{preserve}.json"))
    finally:
        dist.destroy_process_group()


def _stage2_variant(rank: int, cfg: Config, paths: list[str], out: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from tocoad_ray.data import Preprocess
    from tocoad_ray.synth import AnomalyGenerator
    from tocoad_ray.train import (
        Stage2Trainer,
        build_extractor,
        make_stage2_batch,
        prepare_images,
    )
    from tocoad_ray.train.schedule import row_rng
    from tocoad_ray.train.seeding import seeded_init
    from tocoad_ray.train.stage1 import build_discriminator
    from tocoad_ray.train.views import view_augment

    # as stages.build_stage_trainer builds it for stage II (D from stage I)
    extractor = seeded_init(cfg.seed, 0, lambda: build_extractor(cfg))
    trainer = Stage2Trainer(cfg, extractor, "cpu", discriminator=build_discriminator(cfg, extractor))
    before = {n: p.detach().clone() for n, p in extractor.named_parameters()}
    trainer.distribute(lambda m: DistributedDataParallel(m))  # find_unused_parameters=False
    pre = Preprocess(cfg.data, extractor.mean, extractor.std)
    images = prepare_images(paths, pre)
    g = cfg.generator
    make = dict(preprocess=pre, num_views=cfg.stage2.num_views, augment=view_augment(cfg, pre.size),
                generator=AnomalyGenerator(g.kind, normal_prob=g.normal_prob, rotate=g.rotate))
    per_worker = cfg.stage2.batch_size // WORLD
    losses = []
    for step in range(3):
        rows = [(step * cfg.stage2.batch_size + rank * per_worker + i) % len(images) for i in range(per_worker)]
        batch = make_stage2_batch([images[r] for r in rows], rng=[row_rng(cfg.seed, 2, 0, r) for r in rows], **make)
        losses.append(float(trainer.train_step(batch)["loss"]))
    changed = sorted({n.split(".")[2] for n, p in extractor.named_parameters() if not torch.equal(p, before[n])})
    digest = float(sum(p.double().sum() for p in extractor.parameters()))
    out.write_text(json.dumps({"losses": losses, "changed": changed, "digest": digest}))


PRESERVE = ["none", "feature", "l2sp"]


def test_ddp_stage2_with_stage2_layers_short_of_the_last_block(data_root, tmp_path):
    """Every ``stage2.preserve`` variant (each adds its own parameters and losses to the step)."""
    paths = sorted((data_root / "mvtec_ad" / "bottle" / "train" / "good").glob("*.png"))[:4]
    if len(paths) < 4:
        pytest.skip("mvtec_ad/bottle training images not found")
    _spawn(_stage2_worker, str(tmp_path / "store"), PRESERVE, [str(p) for p in paths], str(tmp_path))
    for preserve in PRESERVE:
        _check_variant([json.loads((tmp_path / f"rank{r}-{preserve}.json").read_text()) for r in range(WORLD)])


def _check_variant(got: list[dict]) -> None:
    for g in got:
        assert len(g["losses"]) == 3 and all(np.isfinite(g["losses"]))
        # F trained up to blocks.4; EfficientNet's blocks.5 and blocks.6 feed no loss and stay as they were
        assert "4" in g["changed"] and not {"5", "6"} & set(g["changed"])
    assert got[0]["digest"] == got[1]["digest"]  # DDP kept the workers' F identical


# --- bench/gpu_check.py without a GPU ---------------------------------------------------------------
def test_gpu_check_without_cuda_says_so_and_exits_2():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU for torch, on any machine
    r = subprocess.run([sys.executable, str(root / "bench" / "gpu_check.py"), "--quick"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    out = json.loads(r.stdout)
    assert out["cuda"] is False and "no CUDA device" in out["error"] and out["checks"] == {}
