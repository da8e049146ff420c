"""Ray Data pipelines that feed stage I and stage II.

1. ``decode_images``: the category's training images decoded and resized once (``prepare_images``,
   the same geometry as the single-process trainer), materialised, then put in the object store in
   row order (``ImageStore``) so every sample task reads them zero-copy.
2. ``epoch_dataset``: per worker, that worker's slice of every step of the epochs it still has
   to train (``epoch_rows``: the same seeded permutation the single-process loop uses), mapped by
   ``map_batches`` into training rows: stage I (G(I), y_G); stage II M augmented views of I plus
   G's sample and its mask. Each row's randomness is ``row_rng(seed, stage, epoch, row)``, never
   an RNG kept in a process, so every epoch sees new samples, any worker count and any restart
   make the same rows, and one worker reproduces the single-process batches exactly.
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..config import Config, DataConfig, from_dict
from ..data import Preprocess
from ..train.images import prepare_images
from ..train.priority import call_at_lower_priority
from ..train.schedule import epoch_rows, row_rng, steps_per_epoch
from ..train.stage1 import make_stage1_batch
from ..train.stage2 import make_stage2_batch
from ..train.views import view_augment


@dataclass(frozen=True)
class SampleSpec:
    """What a sample task needs to rebuild G, the preprocessing and the augmentation set S."""

    stage: int  # 1 or 2
    config: str  # Config as JSON (hashable, cache key)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    with_generator: bool = True  # stage II: False for NCL only (no D, no G's samples)

    @classmethod
    def build(cls, cfg: Config, stage: int, mean: Sequence[float], std: Sequence[float], with_generator: bool = True
              ) -> "SampleSpec":
        return cls(stage, json.dumps(cfg.to_dict(), sort_keys=True), tuple(map(float, mean)), tuple(map(float, std)),
                   with_generator)

    @property
    def cfg(self) -> Config:
        return from_dict(Config, json.loads(self.config))


@functools.lru_cache(maxsize=8)
def _tools(spec: SampleSpec):
    from ..synth import AnomalyGenerator

    cfg = spec.cfg
    pre = Preprocess(cfg.data, list(spec.mean), list(spec.std))
    gen = AnomalyGenerator.from_config(cfg.generator)
    return cfg, pre, gen, view_augment(cfg, pre.size)


_STORES: dict[str, list[np.ndarray]] = {}


def _images(store) -> list[np.ndarray]:
    """The decoded images behind an ObjectRef, fetched once per process (read-only, zero-copy)."""
    import ray

    key = store.hex()
    if key not in _STORES:
        _STORES.clear()  # one category's images at a time per process
        _STORES[key] = ray.get(store)
    return _STORES[key]


def make_rows(batch: dict[str, np.ndarray], spec: SampleSpec, store) -> dict[str, np.ndarray]:
    """``map_batches`` function: {"epoch", "row"} → training rows of ``spec.stage``, made by the
    trainers' own batch makers with one ``row_rng`` per row, in a thread at the lower priority of
    ``compute.sample_niceness`` (a training worker may share the node's cores)."""
    return call_at_lower_priority(_make_rows, _tools(spec)[0].compute.sample_niceness, batch, spec, store)


def _make_rows(batch: dict[str, np.ndarray], spec: SampleSpec, store) -> dict[str, np.ndarray]:
    cfg, pre, gen, augment = _tools(spec)
    images = _images(store)
    imgs = [images[int(r)] for r in batch["row"]]
    rngs = [row_rng(cfg.seed, spec.stage, int(e), int(r)) for e, r in zip(batch["epoch"], batch["row"])]
    if spec.stage == 1:
        made = make_stage1_batch(imgs, gen, pre, rngs)
    else:
        made = make_stage2_batch(imgs, pre, rngs, cfg.stage2.num_views, augment, gen if spec.with_generator else None)
        for k in ("views", "boxes"):  # [B, M, ...]: one row per image
            made[k] = torch.stack(made[k], dim=1)
    return {"epoch": batch["epoch"], "row": batch["row"], **{k: v.numpy() for k, v in made.items()}}


def to_trainer_batch(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A batch from ``iter_torch_batches`` → the dict ``Stage{1,2}Trainer.train_step`` takes."""
    out: dict[str, Any] = {k: batch[k] for k in ("image", "mask") if k in batch}
    for k in ("views", "boxes"):
        if k in batch:
            out[k] = list(batch[k].unbind(1))
    return out


def configure_data_context() -> None:
    """Deterministic row order, no progress bars or per-execution banners in the logs."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.execution_options.verbose_progress = False
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def worker_batch(n_images: int, batch_size: int, max_steps: int | None, world: int) -> tuple[int, int, int]:
    """(global batch, steps per epoch, per-worker batch = global batch / workers)."""
    b, steps = steps_per_epoch(n_images, batch_size, max_steps)
    if b % world:
        raise ValueError(f"the global batch of {b} images does not split over {world} workers: choose "
                         f"distributed.num_workers dividing the batch size (the paper's batch and LR are kept)")
    return b, steps, b // world


def epoch_dataset(store, n_images: int, spec: SampleSpec, epoch: int, rank: int, world: int, data_cpus: float = 0.5,
                  data_tasks: int = 2, epochs: int = 1):
    """Lazy Dataset of worker ``rank``'s rows for epochs ``epoch`` … ``epoch + epochs - 1``: for
    every step of every epoch, its slice of the global batch, in order. One dataset streams all the
    epochs a worker still has to train (after a restart: from its checkpoint's epoch), so G's tasks
    run ahead across epoch boundaries instead of starting a pipeline per epoch. Up to
    ``data_tasks`` tasks at once, one step's slice each. Executes when iterated."""
    import ray
    from ray.data import TaskPoolStrategy

    cfg = spec.cfg
    scfg = cfg.stage1 if spec.stage == 1 else cfg.stage2
    b, steps, bw = worker_batch(n_images, scfg.batch_size, scfg.max_steps_per_epoch, world)
    items = []
    for e in range(epoch, epoch + epochs):
        rows = epoch_rows(n_images, scfg.batch_size, scfg.max_steps_per_epoch, cfg.seed, spec.stage, e)
        items += [{"epoch": int(e), "row": int(r)} for r in rows[:, rank * bw:(rank + 1) * bw].reshape(-1)]
    ds = ray.data.from_items(items, override_num_blocks=steps * epochs)
    return ds.map_batches(make_rows, fn_kwargs={"spec": spec, "store": store}, batch_size=bw, num_cpus=data_cpus,
                          compute=TaskPoolStrategy(size=data_tasks))


def _decode(batch: dict[str, np.ndarray], data: dict, mean: list[float], std: list[float]) -> dict[str, Any]:
    pre = Preprocess(from_dict(DataConfig, data), mean, std)
    return {"row": batch["row"], "image": prepare_images([Path(p) for p in batch["path"]], pre)}


def decode_images(paths: Sequence[str | Path], cfg: Config, mean: Sequence[float], std: Sequence[float],
                  cpus: float = 1.0, tasks: int = 2):
    """Materialised Dataset {"row", "image"}: every training image decoded and resized once."""
    import ray
    from ray.data import TaskPoolStrategy

    ds = ray.data.from_items([{"row": i, "path": str(p)} for i, p in enumerate(paths)])
    return ds.map_batches(_decode, fn_kwargs={"data": asdict(cfg.data), "mean": list(mean), "std": list(std)},
                          batch_size=16, num_cpus=cpus, compute=TaskPoolStrategy(size=tasks)).materialize()


def local_image_store(paths: Sequence[str | Path], cfg: Config, mean: Sequence[float], std: Sequence[float]):
    """``image_store`` of images decoded in this process (a small training set: no Ray Data job)."""
    import ray

    pre = Preprocess(cfg.data, list(mean), list(std))
    return ray.put([np.ascontiguousarray(img) for img in prepare_images([Path(p) for p in paths], pre)])


def image_store(decoded, n_images: int):
    """ObjectRef to the decoded images as a list in row order (every row exactly once)."""
    import ray

    images: list[np.ndarray | None] = [None] * n_images
    for batch in decoded.iter_batches(batch_size=None, batch_format="numpy"):
        for r, img in zip(batch["row"], batch["image"]):
            if images[int(r)] is not None:
                raise RuntimeError(f"row {int(r)} decoded twice")
            images[int(r)] = np.ascontiguousarray(img)
    missing = [i for i, x in enumerate(images) if x is None]
    if missing:
        raise RuntimeError(f"{len(missing)} training images were not decoded (rows {missing[:5]}…)")
    return ray.put(images)
