"""Stage I and stage II as Ray Train ``TorchTrainer`` runs.

``stage_loop`` runs on every worker: it builds the library's ``Stage1Trainer`` (D over frozen F)
or ``Stage2Trainer`` (F + C with frozen D), wraps the trainable part with
``ray.train.torch.prepare_model`` (DDP: gloo on CPU, nccl on GPU with gloo for CPU tensors:
``torch_config``; nothing to wrap with one worker), resumes from ``ray.train.get_checkpoint()``,
and trains on its shard of the Ray Data pipeline
(``samples.epoch_dataset``: every epoch it still has to train, read with ``iter_torch_batches``,
``steps`` batches per epoch); after each epoch it reports the epoch's metrics (mean over workers) and a checkpoint (rank 0, the library's checkpoint format).

Batch and learning rate: the global batch is ``stage{1,2}.batch_size`` (the paper's) whatever the
number of workers W; each worker takes batch / W rows of every step and DDP averages gradients, so
a step's update is the single-process one up to BatchNorm statistics (per worker) and float
summation order.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..config import Config, from_dict
from ..digest import fingerprint
from ..train.allocator import keep_freed_memory
from ..train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..train.extractor import build_extractor
from ..train.seeding import seeded_init
from .progress import report_progress
from .samples import (
    SampleSpec,
    configure_data_context,
    epoch_dataset,
    to_trainer_batch,
    worker_batch,
)

STAGE_NAMES = {1: "stage1", 2: "stage2"}
# glibc serves a non-main thread (Ray Train V2 runs the loop in one) from 64 MiB arena heaps and
# mmaps every larger tensor afresh; one arena for the process keeps them on the main heap (see
# train/allocator.py). Read at process start, hence an env var of the worker processes.
WORKER_ENV = {"MALLOC_ARENA_MAX": "1"}
HISTORY = "history.json"
# stage II with a validator and ``stage2.keep_best``: F (+ C) of the best-validating epoch so far
BEST_MODEL, BEST_INFO = "best_model.safetensors", "best.json"


def build_stage_trainer(cfg: Config, stage: int, device: torch.device, discriminator_state: dict | None = None):
    """The library's trainer for ``stage``, exactly as ``train_tocoad`` builds it."""
    from ..train.stage1 import Stage1Trainer, build_discriminator
    from ..train.stage2 import Stage2Trainer

    extractor = seeded_init(cfg.seed, 0, lambda: build_extractor(cfg))
    if stage == 1:
        return Stage1Trainer(cfg, extractor, device)
    discriminator = None
    if discriminator_state is not None:
        discriminator = build_discriminator(cfg, extractor)
        discriminator.load_state_dict(discriminator_state)
    return Stage2Trainer(cfg, extractor, device, discriminator=discriminator)


def stage_fingerprint(cfg: Config, stage: int) -> str:
    """A checkpoint may only be resumed by the same configuration (epoch counts may grow)."""
    from ..train.tocoad import _stage_fingerprint

    return fingerprint(_stage_fingerprint(cfg, STAGE_NAMES[stage]))


def run_name(cfg: Config, stage: int, category: str, salt: str | None = None) -> str:
    """Ray Train run name: the same config and category find their checkpoints again; a changed
    config (or, for stage II, another D: ``salt``) starts a fresh run instead of resuming a
    foreign one."""
    digest = hashlib.sha256((stage_fingerprint(cfg, stage) + (salt or "")).encode()).hexdigest()[:10]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in category)
    return f"{safe}-{STAGE_NAMES[stage]}-{digest}"


def mean_over_workers(values: dict[str, float], world: int, device: torch.device | str) -> dict[str, float]:
    """Mean of each value over the ``world`` workers (an all-reduce on the training ``device``:
    nccl only takes CUDA tensors)."""
    if world == 1 or not torch.distributed.is_initialized():
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}


def torch_config(gpu: bool) -> "Any":
    """The workers' process group: on GPU, nccl for CUDA tensors and gloo for CPU ones (a plain
    "nccl" group has no CPU backend, so any CPU-side collective would raise); gloo on CPU.
    Ray passes the string to ``init_process_group`` as is and still sets its NCCL env vars for it."""
    from ray.train.torch import TorchConfig

    return TorchConfig(backend="cpu:gloo,cuda:nccl" if gpu else "gloo")


def _flat(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in metrics.items() if k != "losses" and isinstance(v, (int, float, str, bool))}
    out.update(metrics.get("losses", {}))
    # by stage too: a Tune trial's reports run through stage I then II (tracked apart in MLflow)
    out.update({f"{metrics['stage']}/{k}": v for k, v in metrics.get("losses", {}).items() if "stage" in metrics})
    return out


def stage_loop(config: dict[str, Any]) -> None:
    """Per-worker training function of a stage (Ray Train)."""
    import ray.train
    import ray.train.torch

    keep_freed_memory()  # the loop runs in a non-main thread: see train/allocator.py
    stage = int(config["stage"])
    cfg = from_dict(Config, config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    configure_data_context()
    name = STAGE_NAMES[stage]
    scfg = cfg.stage1 if stage == 1 else cfg.stage2
    trainer = build_stage_trainer(cfg, stage, device, config.get("discriminator"))
    trainer.distribute(ray.train.torch.prepare_model)

    fp = stage_fingerprint(cfg, stage)
    history: list[dict[str, Any]] = []
    validator = config.get("validator")
    keep_best = stage == 2 and cfg.stage2.keep_best and validator is not None
    best: dict[str, Any] | None = None  # rank 0: {"epoch", "val_score", "model"}
    resumed_from = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state, meta = load_checkpoint(Path(d), map_location=device)
            if meta.get("fingerprint") != fp:
                raise CheckpointError(f"{name}: checkpoint was written with another configuration; "
                                      f"use another output folder or storage path")
            trainer.load_state_dict(state)
            history = json.loads((Path(d) / HISTORY).read_text())
            if (Path(d) / BEST_INFO).is_file() and rank == 0:
                best = json.loads((Path(d) / BEST_INFO).read_text())
                best["model"] = load_file(str(Path(d) / BEST_MODEL))
        resumed_from = trainer.epoch

    n = int(config["n_images"])
    _, steps, bw = worker_batch(n, scfg.batch_size, scfg.max_steps_per_epoch, world)
    spec: SampleSpec = config["spec"]
    remaining = scfg.epochs - trainer.epoch
    if remaining > 0:
        ds = epoch_dataset(config["store"], n, spec, trainer.epoch, rank, world, cfg.distributed.data_cpus,
                           cfg.distributed.data_tasks, epochs=remaining)
        stream = iter(ds.iter_torch_batches(batch_size=bw, drop_last=False))
    for epoch in range(trainer.epoch, scfg.epochs):
        batches = (to_trainer_batch(b) for b in itertools.islice(stream, steps))
        m = trainer.train_epoch(batches, epoch)
        if m["steps"] != steps:
            raise RuntimeError(f"{name} epoch {epoch}: worker {rank} got {m['steps']} batches, expected {steps}")
        m["losses"] = mean_over_workers(m["losses"], world, device)
        m.update(workers=world, images=steps * bw * world, resumed_from=resumed_from)
        if validator is not None and rank == 0:  # validation.QuickValidator: F's score on held-out images
            m.update(validator(trainer.extractor), val_bank="quick", stage=name)
            if keep_best and (best is None or m["val_score"] > best["val_score"]):  # ties: the earlier epoch
                best = {"epoch": m["epoch"], "val_score": m["val_score"],
                        "model": {k: v.detach().cpu().clone() for k, v in trainer.state_dict()["model"].items()}}
            if best is not None:
                m["best_epoch"] = best["epoch"]
        history.append(m)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint(Path(tmp), trainer.state_dict(), {"stage": name, "epochs_planned": scfg.epochs,
                                                                   "fingerprint": fp})
                (Path(tmp) / HISTORY).write_text(json.dumps(history))
                if best is not None:
                    save_file({k: v.contiguous() for k, v in best["model"].items()}, str(Path(tmp) / BEST_MODEL))
                    (Path(tmp) / BEST_INFO).write_text(json.dumps({k: best[k] for k in ("epoch", "val_score")}))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(_flat(m), checkpoint=ckpt)
        if rank == 0:
            report_progress(config.get("progress"), config.get("category", ""), stage=name, epoch=m["epoch"],
                            epochs=scfg.epochs, loss=m["losses"].get("loss"), epoch_seconds=m["seconds"])


@dataclass
class StageResult:
    """What a finished stage hands the driver: the trainer state (model weights first), the
    per-epoch metrics, and how it ran."""

    state: dict[str, Any]
    history: list[dict[str, Any]]
    seconds: float
    workers: int
    run_name: str
    attempts_resumed: list[int] = field(default_factory=list)
    best_epoch: int | None = None  # kept epoch (state["model"] is its weights); None: the last one


def use_gpu(cfg: Config) -> bool:
    """``distributed.use_gpu``, or (None) whether the connected cluster has GPUs."""
    import ray

    if cfg.distributed.use_gpu is not None:
        return cfg.distributed.use_gpu
    return ray.cluster_resources().get("GPU", 0) > 0


def scaling(cfg: Config, gpu: bool | None = None) -> "Any":
    from ray.train import ScalingConfig

    d = cfg.distributed
    gpu = use_gpu(cfg) if gpu is None else gpu
    res = {"CPU": d.cpus_per_worker, **d.worker_resources}
    if gpu:
        res["GPU"] = d.gpus_per_worker
    return ScalingConfig(num_workers=d.num_workers, use_gpu=gpu, resources_per_worker=res,
                         placement_strategy=d.placement_strategy)


def run_stage(cfg: Config, stage: int, category: str, store, n_images: int, spec: SampleSpec, storage_path: str,
              discriminator_state: dict | None = None, progress: str | None = None, salt: str | None = None,
              validator=None, callbacks: list | None = None) -> StageResult:
    """Fit one stage with a TorchTrainer; resumes the run of the same name in ``storage_path``.
    ``validator`` (rank 0, after every epoch) adds validation metrics to the report; ``callbacks``
    are Ray Train callbacks (Tune's ``TuneReportCallback`` inside a trial)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    name = run_name(cfg, stage, category, salt)
    gpu = use_gpu(cfg)
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        stage_loop,
        train_loop_config={"stage": stage, "cfg": cfg.to_dict(), "store": store, "n_images": n_images, "spec": spec,
                           "discriminator": discriminator_state,
                           "progress": progress, "category": category, "validator": validator},
        scaling_config=scaling(cfg, gpu),
        torch_config=torch_config(gpu),
        run_config=RunConfig(name=name, storage_path=str(storage_path),
                             failure_config=FailureConfig(max_failures=cfg.distributed.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             worker_runtime_env={"env_vars": WORKER_ENV}, callbacks=callbacks),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{STAGE_NAMES[stage]} of {category!r} finished without a checkpoint")
    best_epoch = None
    with result.checkpoint.as_directory() as d:
        state, _ = load_checkpoint(Path(d))
        history = json.loads((Path(d) / HISTORY).read_text())
        if (Path(d) / BEST_INFO).is_file():  # the best-validating epoch's weights replace the last ones
            best_epoch = int(json.loads((Path(d) / BEST_INFO).read_text())["epoch"])
            state["model"] = load_file(str(Path(d) / BEST_MODEL))
    resumed = sorted({int(h.get("resumed_from", 0)) for h in history})
    return StageResult(state, history, time.perf_counter() - t0, cfg.distributed.num_workers, name, resumed,
                       best_epoch)
