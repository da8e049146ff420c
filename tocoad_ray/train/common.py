"""Shared pieces of the ToCoAD trainers: deterministic per-step RNGs, batch iteration, the view
augmentation set S (§3.2), image preparation and the extractor F with every level D needs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as Fn

from ..config import Config
from ..data import Preprocess, read_image
from ..models.backbone import FeatureExtractor

STAGE_IDS = {"stage1": 1, "stage2": 2}


def step_rng(seed: int, stage: int, epoch: int, step: int | None = None) -> np.random.Generator:
    """Independent RNG per (seed, stage, epoch[, step]): a fixed seed reproduces a run and a resumed
    run draws exactly the numbers the uninterrupted run would have drawn."""
    key = [int(seed), int(stage), int(epoch)] + ([] if step is None else [int(step)])
    return np.random.default_rng(key)


def steps_per_epoch(n_images: int, batch_size: int, max_steps: int | None) -> tuple[int, int]:
    """(batch size, steps): batch = min(batch_size, N); drop_last; capped by ``max_steps``."""
    if n_images < 2:
        raise ValueError(f"training needs at least 2 images, got {n_images}")
    b = max(2, min(batch_size, n_images))  # BN in D / C needs >= 2 samples
    steps = n_images // b
    if max_steps is not None:
        steps = min(steps, int(max_steps))
    return b, max(1, steps)


def row_rng(seed: int, stage: int, epoch: int, row: int) -> np.random.Generator:
    """The RNG of one training row (image index) in one epoch. Every random draw for a sample (G's
    anomaly, the M view augmentations) comes from it, so a sample depends only on (seed, stage,
    epoch, row): not on the batch it lands in, the worker that makes it, or what ran before."""
    return np.random.default_rng([int(seed), int(stage), int(epoch), _ROW_KEY, int(row)])


_ROW_KEY = 0x524F57  # "ROW": keeps row keys apart from step_rng's (seed, stage, epoch, step) keys


def epoch_rows(n_images: int, batch_size: int, max_steps: int | None, seed: int, stage: int, epoch: int) -> np.ndarray:
    """[steps, batch] image indices of one epoch: a seeded permutation, drop_last, capped steps.
    Step s trains on row ``out[s]``; with W data-parallel workers, worker r takes the r-th of W
    equal slices of it (per-worker batch = global batch / W), so the global batch is the same."""
    b, steps = steps_per_epoch(n_images, batch_size, max_steps)
    order = step_rng(seed, stage, epoch).permutation(n_images)
    return order[: steps * b].reshape(steps, b)


def iter_batches(images: Sequence[np.ndarray], batch_size: int, max_steps: int | None, seed: int, stage: int, epoch: int,
                 make: Callable[[list[np.ndarray], list[np.random.Generator]], dict]) -> Iterator[dict]:
    """Yield the batches of one epoch: ``make(images, rngs)`` with one ``row_rng`` per image.
    Pure function of (seed, stage, epoch): the Ray pipeline builds the same batches."""
    for rows in epoch_rows(len(images), batch_size, max_steps, seed, stage, epoch):
        yield make([images[i] for i in rows], [row_rng(seed, stage, epoch, i) for i in rows])


def per_image(rng: np.random.Generator | Sequence[np.random.Generator], n: int) -> list[np.random.Generator]:
    """One RNG per image: a list passes through; a single generator is shared (drawn in order)."""
    if isinstance(rng, np.random.Generator):
        return [rng] * n
    rngs = list(rng)
    if len(rngs) != n:
        raise ValueError(f"need one RNG per image: {n} images, {len(rngs)} RNGs")
    return rngs


class ViewAugment:
    """Augmentation set S (§3.2, as SimSiam [40]): RandomResizedCrop to the input size (scale
    ``scale``, paper 0.2-1), ColorJitter(j, j, j, j/4) with p = 0.8 (paper j = 0.4),
    RandomGrayscale p = 0.2; torchvision.transforms.v2 on a [0, 1] float 3xHxW tensor.

    ``sample`` also returns the crop box (top, left, height, width) as fractions of the input
    image: the dense stage-II variant pairs feature cells of two views through their boxes."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.2, 1.0), jitter: float = 0.4):
        from torchvision.transforms import v2

        self.size = int(size)
        self.crop = v2.RandomResizedCrop(self.size, scale=tuple(scale), antialias=True)
        colour = [v2.RandomGrayscale(p=0.2)]
        if jitter > 0:
            colour.insert(0, v2.RandomApply([v2.ColorJitter(jitter, jitter, jitter, jitter / 4)], p=0.8))
        self.colour = v2.Compose(colour)

    def sample(self, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(view, box): deterministic for ``seed``; the global torch RNG is left untouched."""
        from torchvision.transforms.v2 import functional as TF

        h, w = x.shape[-2:]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            p = self.crop.make_params([x])  # same draws, in the same order, as the Compose it replaces
            view = TF.resized_crop(x, p["top"], p["left"], p["height"], p["width"], [self.size, self.size], antialias=True)
            view = self.colour(view).clamp(0.0, 1.0)
        box = torch.tensor([p["top"] / h, p["left"] / w, p["height"] / h, p["width"] / w], dtype=torch.float32)
        return view, box

    def __call__(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        return self.sample(x, seed)[0]


def view_augment(cfg: Config, size: int) -> ViewAugment:
    """S as ``cfg.stage2`` sets it (crop scale, jitter strength)."""
    s = cfg.stage2
    return ViewAugment(size, scale=(s.crop_scale_min, 1.0), jitter=s.color_jitter)


def prepare_images(images: Sequence[np.ndarray | str | Path], preprocess: Preprocess) -> list[np.ndarray]:
    """Read paths and resize every image once to the preprocessing geometry (before the centre
    crop), so G works on ``image_size`` images and ``preprocess`` only crops afterwards."""
    out = []
    for img in images:
        if isinstance(img, (str, Path)):
            img = read_image(img)
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"training images must be uint8 HxWx3, got {img.dtype} {img.shape}")
        rh, rw, _, _ = preprocess.geometry(*img.shape[:2])
        if (rh, rw) != img.shape[:2]:
            t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
            t = Fn.interpolate(t, size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)
            img = t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
        out.append(np.ascontiguousarray(img))
    return out


def needed_layers(cfg: Config) -> list[str]:
    """Every feature level of F from the shallowest down to the deepest layer any part uses
    (``backbone.layers``, and ``backbone.stage2_layers`` when stage II runs): D consumes them all."""
    import timm

    names = timm.create_model(cfg.backbone.name, pretrained=False, features_only=True).feature_info.module_name()
    used = list(cfg.backbone.layers) + (list(cfg.backbone.stage2_layers) if cfg.stage2.enabled else [])
    missing = [l for l in used if l not in names]
    if missing:
        raise ValueError(f"backbone {cfg.backbone.name!r} has no feature layer(s) {missing}; available: {names}")
    return names[: max(names.index(l) for l in used) + 1]


def build_extractor(cfg: Config, weights: str | None = None) -> FeatureExtractor:
    """F with all ``needed_layers``; its ``body.state_dict()`` loads into any FeatureExtractor of the
    same backbone with a subset of these layers (loading is by name)."""
    return FeatureExtractor(cfg.backbone.name, layers=needed_layers(cfg), weights=weights or cfg.backbone.weights)


def rng_state(seed: int) -> dict[str, Any]:
    state: dict[str, Any] = {"seed": int(seed), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def seeded_init(seed: int, salt: int, build: Callable[[], Any]) -> Any:
    """Build modules under a derived seed without touching the global RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed) * 1009 + salt)
        return build()


def fingerprint(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)
