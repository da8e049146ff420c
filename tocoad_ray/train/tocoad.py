"""Entry point of ToCoAD's two-stage training: stage I (DNP, §3.1) then stage II (NCL, §3.2).

``train_tocoad`` returns the fine-tuned F's ``body.state_dict()``; the caller saves it (e.g. as
safetensors) and rebuilds ``FeatureExtractor(name, cfg.backbone.layers, weights=<file>)``, which
loads by name (the trained body holds every level up to the deepest one used, a superset).
"""
from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..config import Config
from ..data import Preprocess
from ..digest import fingerprint
from ..models.backbone import resolve_device
from ..synth import AnomalyGenerator
from .allocator import keep_freed_memory
from .checkpoint import (
    CheckpointError,
    clear_checkpoint,
    load_checkpoint,
    read_pointer,
    save_checkpoint,
)
from .bn_folding import unfold_bn
from .extractor import build_extractor, needed_layers
from .images import prepare_images
from .schedule import STAGE_IDS, iter_batches, prefetched, steps_per_epoch
from .seeding import seeded_init
from .stage1 import Stage1Trainer, make_stage1_batch
from .stage2 import Stage2Trainer, make_stage2_batch
from .views import view_augment

logger = logging.getLogger(__name__)

LOG_NAME = "train_log.jsonl"


def _stage_fingerprint(cfg: Config, stage: str) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed (epochs and step caps may change)."""
    def section(obj, drop=("epochs", "max_steps_per_epoch")):
        return {k: v for k, v in vars(obj).items() if k not in drop}

    fp = {"seed": cfg.seed, "backbone": {"name": cfg.backbone.name, "weights": cfg.backbone.weights,
                                        "layers": needed_layers(cfg)},
          "input_size": cfg.data.input_size, "generator": vars(cfg.generator), "stage1": section(cfg.stage1)}
    if stage == "stage2":
        fp["stage2"] = section(cfg.stage2)
        fp["stage2_layers"] = list(cfg.backbone.stage2_layers)
    return json.loads(fingerprint(fp))


def _run_stage(trainer, stage: str, cfg_stage, workdir: Path, make_batch: Callable, images: list[np.ndarray], seed: int,
               resume: bool, progress: bool, log: Callable[[str], None], fp: dict, niceness: int = 0) -> bool:
    """Train one stage with per-epoch checkpoints (batches made ahead in a thread at ``niceness``).
    Returns True when any epoch ran."""
    from tqdm.auto import tqdm

    sdir = workdir / stage
    if resume and read_pointer(sdir) is not None:
        state, meta = load_checkpoint(sdir, map_location=trainer.device)
        if meta.get("fingerprint") != fp:
            raise CheckpointError(f"checkpoint in {sdir} was written with a different configuration "
                                  f"({meta.get('fingerprint')} vs {fp}); train with resume=False or another workdir")
        trainer.load_state_dict(state)
        if trainer.epoch >= cfg_stage.epochs:
            log(f"{stage}: complete ({trainer.epoch}/{cfg_stage.epochs} epochs), skipped")
            return False
        log(f"{stage}: resuming after epoch {trainer.epoch}/{cfg_stage.epochs}")
    else:
        clear_checkpoint(sdir)
    b, steps = steps_per_epoch(len(images), cfg_stage.batch_size, cfg_stage.max_steps_per_epoch)
    for epoch in range(trainer.epoch, cfg_stage.epochs):
        batches = prefetched(iter_batches(images, cfg_stage.batch_size, cfg_stage.max_steps_per_epoch, seed,
                                          STAGE_IDS[stage], epoch, make_batch), niceness=niceness)
        bar = tqdm(batches, total=steps, disable=not progress, desc=f"{stage} {epoch + 1}/{cfg_stage.epochs}", leave=False)
        metrics = trainer.train_epoch(bar, epoch)
        save_checkpoint(sdir, trainer.state_dict(), {"stage": stage, "epochs_planned": cfg_stage.epochs, "fingerprint": fp})
        with open(workdir / LOG_NAME, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        extra = f" proj_std {metrics['proj_std']:.4f}" if "proj_std" in metrics else ""
        log(f"{stage} epoch {metrics['epoch']}/{cfg_stage.epochs}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics["losses"].items())
            + f" lr {metrics['lr']:.3g}{extra} ({metrics['seconds']:.1f}s, {metrics['steps']} steps of {b})")
        if metrics.get("collapse_warning"):
            log(f"WARNING {stage} epoch {metrics['epoch']}: projector std {metrics['proj_std']:.4g} — collapse suspected")
    return True


def train_tocoad(cfg: Config, images: Sequence[np.ndarray | str | Path], workdir: str | Path, device: str = "auto",
                 resume: bool = False, progress: bool = True, log: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """Run stage I (if ``cfg.stage1.enabled``) then stage II (if ``cfg.stage2.enabled``) on the
    normal training ``images`` (uint8 HxWx3 arrays or paths). Checkpoints go to
    ``workdir/stage{1,2}/``, per-epoch metrics to ``workdir/train_log.jsonl``. ``resume=True``
    continues from the saved epochs (completed stages are skipped). Returns the fine-tuned F body
    state dict (cpu tensors)."""
    log = log or logger.info
    keep_freed_memory()  # reuse freed memory instead of page-faulting every step's tensors in again
    dev = resolve_device(device)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # seeded so that weights="random" (tests) is reproducible too; pretrained weights are unaffected
    extractor = seeded_init(cfg.seed, 0, lambda: build_extractor(cfg))
    preprocess = Preprocess(cfg.data, extractor.mean, extractor.std)
    imgs = prepare_images(images, preprocess)
    generator = AnomalyGenerator.from_config(cfg.generator)
    log(f"ToCoAD training on {dev}: {len(imgs)} images, F={cfg.backbone.name} levels {extractor.layers}")

    discriminator = None
    stage1_ran = False
    if cfg.stage1.enabled:
        t1 = Stage1Trainer(cfg, extractor, dev)
        make1 = partial(_make1, generator=generator, preprocess=preprocess)
        stage1_ran = _run_stage(t1, "stage1", cfg.stage1, workdir, make1, imgs, cfg.seed, resume, progress, log,
                                _stage_fingerprint(cfg, "stage1"), cfg.compute.sample_niceness)
        discriminator = t1.discriminator
    if cfg.stage2.enabled:
        if stage1_ran:  # a new D invalidates any stage-II checkpoint built on the old one
            clear_checkpoint(workdir / "stage2")
        t2 = Stage2Trainer(cfg, extractor, dev, discriminator=discriminator)
        augment = view_augment(cfg, preprocess.size)
        make2 = partial(make_stage2_batch, preprocess=preprocess, num_views=cfg.stage2.num_views, augment=augment,
                        generator=generator if discriminator is not None else None)
        _run_stage(t2, "stage2", cfg.stage2, workdir, lambda ims, rng: make2(ims, rng=rng), imgs, cfg.seed, resume,
                   progress, log, _stage_fingerprint(cfg, "stage2"), cfg.compute.sample_niceness)
    unfold_bn(extractor)  # back from the training form and layout
    extractor.to(memory_format=torch.contiguous_format).eval()
    extractor.refresh_checksum()
    return {k: v.detach().cpu().clone() for k, v in extractor.body.state_dict().items()}


def _make1(images, rng, generator, preprocess):
    return make_stage1_batch(images, generator, preprocess, rng)
