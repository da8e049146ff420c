"""Stage I and stage II in one Ray Train ``TorchTrainer`` run.

``stage_loop`` runs on every worker, for each stage in turn: it builds the library's
``Stage1Trainer`` (D over frozen F), then ``Stage2Trainer`` (F + C with stage I's D, handed over
in memory), wraps the trainable part with ``ray.train.torch.prepare_model`` (DDP: gloo on CPU,
nccl on GPU with gloo for CPU tensors: ``torch_config``; nothing to wrap with one worker), resumes
from ``ray.train.get_checkpoint()`` (the stage it was in; stage II's checkpoints hold D too), and
trains on its shard of the Ray Data pipeline (``samples.epoch_dataset``: every epoch it still has
to train, read with ``iter_torch_batches``, ``steps`` batches per epoch); after each epoch it
reports the epoch's metrics (mean over workers) and a checkpoint (rank 0, the library's checkpoint
format). One worker group for both stages: its start-up (process starts, imports, process group)
is paid once.

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
D_MODEL = "discriminator.safetensors"  # stage II's checkpoints: the D it trains against


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


def run_name(cfg: Config, stages: int | list[int], category: str, salt: str | None = None) -> str:
    """Ray Train run name: the same config and category find their checkpoints again; a changed
    config (or, for stage II alone, another D: ``salt``) starts a fresh run instead of resuming a
    foreign one. Stage I and II in one run: ``<category>-train-<digest>``."""
    stages = [stages] if isinstance(stages, int) else list(stages)
    fps = "".join(stage_fingerprint(cfg, s) for s in stages)
    digest = hashlib.sha256((fps + (salt or "")).encode()).hexdigest()[:10]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in category)
    return f"{safe}-{STAGE_NAMES[stages[0]] if len(stages) == 1 else 'train'}-{digest}"


def mean_over_workers(values: dict[str, float], world: int, device: torch.device | str) -> dict[str, float]:
    """Mean of each value over the ``world`` workers (an all-reduce on the training ``device``:
    nccl only takes CUDA tensors)."""
    if world == 1 or not torch.distributed.is_initialized():
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}


def rank_zero_state(state: dict[str, torch.Tensor], world: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Rank 0's copy of ``state`` on every worker (cpu). DDP keeps parameters equal but each worker
    updates its own BatchNorm running statistics after the last broadcast, so D's buffers differ
    by rank at the end of stage I; stage II must run on the D that the checkpoint holds."""
    out = {k: v.detach().to(device).clone() for k, v in state.items()}
    if world > 1 and torch.distributed.is_initialized():
        for k in sorted(out):  # the same order on every rank; on the training device (nccl takes CUDA only)
            torch.distributed.broadcast(out[k], src=0)
    return {k: v.cpu() for k, v in out.items()}


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


def _resume_point(checkpoint, stages: list[int], cfg: Config, device) -> dict[str, Any] | None:
    """What a restarted run resumes from: the stage it was in, that stage's trainer state, the
    history so far, D's weights (for a run that is already past stage I) and the kept best epoch."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        d = Path(d)
        state, meta = load_checkpoint(d, map_location=device)
        name = meta.get("stage")
        stage = next((s for s in stages if STAGE_NAMES[s] == name), None)
        if stage is None or meta.get("fingerprint") != stage_fingerprint(cfg, stage):
            raise CheckpointError(f"{name}: checkpoint was written with another configuration; "
                                  f"use another output folder or storage path")
        point = {"stage": stage, "state": state, "history": json.loads((d / HISTORY).read_text()),
                 "discriminator": load_file(str(d / D_MODEL)) if (d / D_MODEL).is_file() else None, "best": None}
        if (d / BEST_INFO).is_file():
            point["best"] = {**json.loads((d / BEST_INFO).read_text()), "model": load_file(str(d / BEST_MODEL))}
        return point


def stage_loop(config: dict[str, Any]) -> None:
    """Per-worker training function (Ray Train): the stages of ``config["stages"]`` in order in one
    worker group, stage I's D handed to stage II in memory (no second group to start)."""
    import ray.train
    import ray.train.torch

    keep_freed_memory()  # the loop runs in a non-main thread: see train/allocator.py
    stages = [int(s) for s in config["stages"]]
    cfg = from_dict(Config, config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    configure_data_context()
    validator = config.get("validator")
    n = int(config["n_images"])
    history: list[dict[str, Any]] = []
    d_state = config.get("discriminator")  # stage II alone: D from an earlier run
    point = _resume_point(ray.train.get_checkpoint(), stages, cfg, device)
    if point is not None:
        history = point["history"]
        if point["discriminator"] is not None:
            d_state = point["discriminator"]
    first = stages.index(point["stage"]) if point is not None else 0
    for stage in stages[first:]:
        resume = point if point is not None and point["stage"] == stage else None
        trainer = build_stage_trainer(cfg, stage, device, d_state)
        trainer.distribute(ray.train.torch.prepare_model)
        best = resume["best"] if resume is not None and rank == 0 else None  # rank 0: {"epoch", "val_score", "model"}
        resumed_from = 0
        if resume is not None:
            trainer.load_state_dict(resume["state"])
            resumed_from = trainer.epoch
        _train_stage(trainer, stage, cfg, config, rank, world, device, n, history, best, resumed_from,
                     validator, d_state if stage == 2 else None)
        if stage == 1:  # D for stage II: rank 0's, as the checkpoint and a restart hold it
            d_state = rank_zero_state(trainer.state_dict()["model"], world, device)
        del trainer


def _train_stage(trainer, stage: int, cfg: Config, config: dict[str, Any], rank: int, world: int, device, n: int,
                 history: list[dict[str, Any]], best: dict[str, Any] | None, resumed_from: int, validator,
                 d_state: dict | None) -> None:
    """The epochs of one stage still to train: Ray Data rows in, one report + checkpoint per epoch."""
    import ray.train

    name = STAGE_NAMES[stage]
    scfg = cfg.stage1 if stage == 1 else cfg.stage2
    fp = stage_fingerprint(cfg, stage)
    keep_best = stage == 2 and cfg.stage2.keep_best and validator is not None
    _, steps, bw = worker_batch(n, scfg.batch_size, scfg.max_steps_per_epoch, world)
    spec: SampleSpec = config["specs"][str(stage)]
    remaining = scfg.epochs - trainer.epoch
    if rank == 0:
        report_progress(config.get("progress"), config.get("category", ""), stage=name, epoch=trainer.epoch,
                        epochs=scfg.epochs)
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
                if d_state is not None:  # a restart inside stage II needs D without stage I's checkpoint
                    save_file({k: v.contiguous() for k, v in d_state.items()}, str(Path(tmp) / D_MODEL))
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
    run_seconds: float = 0.0  # wall time of the whole run (worker start and every stage in it)


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


def run_stages(cfg: Config, stages: list[int], category: str, store, n_images: int, specs: dict[int, SampleSpec],
               storage_path: str, discriminator_state: dict | None = None, progress: str | None = None,
               salt: str | None = None, validator=None, callbacks: list | None = None) -> dict[int, StageResult]:
    """Fit ``stages`` (stage I, then stage II with its D) in one TorchTrainer run; resumes the run
    of the same name in ``storage_path`` (mid-stage, or past stage I with D from the checkpoint).
    ``discriminator_state``: D for a run of stage II alone. ``validator`` (rank 0, after every
    epoch) adds validation metrics to the report; ``callbacks`` are Ray Train callbacks (Tune's
    ``TuneReportCallback`` inside a trial)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    stages = sorted(int(s) for s in stages)
    name = run_name(cfg, stages, category, salt)
    gpu = use_gpu(cfg)
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        stage_loop,
        train_loop_config={"stages": stages, "cfg": cfg.to_dict(), "store": store, "n_images": n_images,
                           "specs": {str(s): specs[s] for s in stages}, "discriminator": discriminator_state,
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
        raise RuntimeError(f"training of {category!r} finished without a checkpoint")
    best_epoch = None
    with result.checkpoint.as_directory() as d:
        state, _ = load_checkpoint(Path(d))
        history = json.loads((Path(d) / HISTORY).read_text())
        d_state = load_file(str(Path(d) / D_MODEL)) if (Path(d) / D_MODEL).is_file() else None
        if (Path(d) / BEST_INFO).is_file():  # the best-validating epoch's weights replace the last ones
            best_epoch = int(json.loads((Path(d) / BEST_INFO).read_text())["epoch"])
            state["model"] = load_file(str(Path(d) / BEST_MODEL))
    seconds = time.perf_counter() - t0
    out: dict[int, StageResult] = {}
    for s in stages:
        h = [m for m in history if m.get("stage") == STAGE_NAMES[s]]
        last = s == stages[-1]
        # the run ends with the last stage's state; an earlier stage I hands on D (all the driver keeps)
        st = state if last else {"model": d_state, "epoch": len(h)}
        if st["model"] is None:
            raise RuntimeError(f"training of {category!r}: the last checkpoint holds no D for stage I's result")
        out[s] = StageResult(st, h, float(sum(m.get("seconds", 0.0) for m in h)), cfg.distributed.num_workers, name,
                             sorted({int(m.get("resumed_from", 0)) for m in h}), best_epoch if last and s == 2 else None,
                             run_seconds=seconds)
    return out


def run_stage(cfg: Config, stage: int, category: str, store, n_images: int, spec: SampleSpec, storage_path: str,
              discriminator_state: dict | None = None, progress: str | None = None, salt: str | None = None,
              validator=None, callbacks: list | None = None) -> StageResult:
    """One stage alone in a TorchTrainer run (``run_stages`` with one stage)."""
    return run_stages(cfg, [stage], category, store, n_images, {stage: spec}, storage_path, discriminator_state,
                      progress, salt, validator, callbacks)[stage]
