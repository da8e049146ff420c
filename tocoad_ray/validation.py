"""A validation objective that never reads the test set.

A factory has no real defects to validate on, and picking epochs or hyperparameters on test AUROC
(as the paper's and the unofficial codes do) leaks the test set into the model. Instead:

1. ``holdout``: a seeded share of the *normal training* images is kept out of fitting (stage I,
   stage II and the bank M never see them);
2. ``build_validation_set``: each held-out image is scored as a normal sample, and once more with a
   synthetic anomaly made by a generator G_val *other* than the training generator G (NSA or
   CutPaste when G is Perlin), whose mask gives pixel labels;
3. ``score_validation``: image AUROC, pixel AUROC and AUPRO of a detector (F + M, eq. 8/9) on that
   set; ``val_score`` is their mean, the default objective of ``tocoad tune``.

``QuickValidator`` scores the F of a training stage against a small bank (all patches of a few
fitting images, no coreset), cheap enough to report after every epoch for ASHA.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .config import Config, ConfigError
from .data import Preprocess
from .synth.generator import GENERATORS

#: auto: the first of these that no trial trains with
VALIDATION_GENERATORS = ("nsa", "cutpaste_scar", "cutpaste", "perlin")
METRICS = ("val_score", "val_image_auroc", "val_pixel_auroc", "val_aupro")


@dataclass
class ValidationConfig:
    """Held-out normal images + G_val's anomalies (see module docstring)."""

    fraction: float = 0.2  # share of the training images held out from fitting
    min_images: int = 4
    max_images: int = 32
    generator: str = "auto"  # auto | perlin | cutpaste | cutpaste_scar | nsa (never the training G)
    quick_bank_images: int = 16  # per-epoch score: bank of all patches of this many fitting images
    min_anomaly_fraction: float = 0.002  # a synthetic anomaly must cover this share of the input after cropping

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise ConfigError(f"validation.fraction must be in (0, 1), got {self.fraction}")
        if self.min_images < 2:
            raise ConfigError(f"validation.min_images must be >= 2, got {self.min_images}")
        if self.max_images < self.min_images:
            raise ConfigError(f"validation.max_images ({self.max_images}) < min_images ({self.min_images})")
        if self.generator != "auto" and self.generator not in GENERATORS:
            raise ConfigError(f"validation.generator must be auto or one of {sorted(GENERATORS)}, got {self.generator!r}")
        if self.quick_bank_images < 1:
            raise ConfigError(f"validation.quick_bank_images must be >= 1, got {self.quick_bank_images}")


def resolve_generator(vcfg: ValidationConfig, training_kinds: Sequence[str]) -> str:
    """G_val: the configured one (an error if some trial trains with it), or the first of
    ``VALIDATION_GENERATORS`` that no trial trains with."""
    used = set(training_kinds)
    if vcfg.generator != "auto":
        if vcfg.generator in used:
            raise ConfigError(f"validation.generator {vcfg.generator!r} is also a training generator "
                              f"({sorted(used)}): the objective would reward fitting G itself; pick another")
        return vcfg.generator
    for kind in VALIDATION_GENERATORS:
        if kind not in used:
            return kind
    raise ConfigError(f"every generator is used for training ({sorted(used)}); none is left for validation")


def holdout(n_images: int, vcfg: ValidationConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, held-out indices), both sorted; a pure function of (n, config, seed)."""
    k = int(np.clip(round(n_images * vcfg.fraction), vcfg.min_images, vcfg.max_images))
    if n_images - k < 2:
        raise ConfigError(f"{n_images} training images are too few to hold out {k} for validation and fit on the "
                          f"rest; lower validation.min_images or add images")
    perm = np.random.default_rng([int(seed), 4242]).permutation(n_images)
    return np.sort(perm[k:]), np.sort(perm[:k])


@dataclass
class ValidationSet:
    """2N preprocessed images (N normal, N with G_val's anomaly), labels and input-size masks."""

    images: torch.Tensor  # [2N, 3, S, S] normalised
    labels: np.ndarray  # [2N] 0/1
    masks: np.ndarray  # [2N, S, S] bool
    generator: str
    sources: list[str] = field(default_factory=list)  # the held-out image files

    def digest(self) -> str:
        h = hashlib.sha256(self.images.numpy().tobytes())
        h.update(self.masks.tobytes())
        return h.hexdigest()[:16]


def build_validation_set(images: Sequence[np.ndarray | str | Path], preprocess: Preprocess, generator: str, seed: int,
                         min_anomaly_fraction: float = 0.002, max_tries: int = 8) -> ValidationSet:
    """Each held-out image once as is (label 0) and once through G_val (label 1, mask y_G).

    G_val runs on the image at ``image_size`` (before the centre crop, like training) without the
    base rotation, so the only difference from the normal image is the anomaly; a draw whose
    anomaly falls outside the crop (or is tiny) is redrawn with the next seed."""
    from .synth import AnomalyGenerator
    from .train.images import prepare_images

    sources = [str(p) for p in images if isinstance(p, (str, Path))]
    base = prepare_images(images, preprocess)
    if len(base) < 2:
        raise ValueError(f"a validation set needs at least 2 held-out images, got {len(base)}")
    xs, ys, ms = [], [], []
    size = preprocess.size
    for i, img in enumerate(base):
        xs.append(preprocess.image(img))
        ys.append(0)
        ms.append(np.zeros((size, size), bool))
    for i, img in enumerate(base):
        others = [b for j, b in enumerate(base) if j != i]  # NSA's patch sources: other held-out images
        gen = AnomalyGenerator(generator, normal_prob=0.0, rotate=False, other_images=others)
        for attempt in range(max_tries):
            out, mask = gen(img, np.random.default_rng([int(seed), 31337, i, attempt]))
            m = preprocess.mask(np.asarray(mask))[0].numpy() > 0.5
            if m.mean() >= min_anomaly_fraction:
                break
        else:
            raise ValueError(f"generator {generator!r} made no visible anomaly on held-out image {i} in {max_tries} tries")
        xs.append(preprocess.image(out))
        ys.append(1)
        ms.append(m)
    return ValidationSet(torch.stack(xs), np.asarray(ys, np.int64), np.stack(ms), generator, sources)


def score_validation(detector, vset: ValidationSet, batch_size: int = 16) -> dict[str, float]:
    """``detector.score`` (a ``pipeline.Detector``: F + M, eq. 8/9 and the blurred map) on the
    validation set → val_image_auroc, val_pixel_auroc, val_aupro and their mean val_score."""
    from .metrics import evaluate_scores

    scores, maps = [], []
    for start in range(0, len(vset.images), batch_size):
        s, m = detector.score(vset.images[start:start + batch_size])
        scores.append(s)
        maps.append(m.astype(np.float32))
    res = evaluate_scores(vset.labels, np.concatenate(scores), vset.masks, np.concatenate(maps))
    out = {"val_image_auroc": res["image_auroc"], "val_pixel_auroc": res["pixel_auroc"], "val_aupro": res["aupro"]}
    out["val_score"] = float(np.mean(list(out.values())))
    return out


class QuickValidator:
    """Per-epoch validation of a training stage's F: bank = every patch of a few fitting images
    (no coreset, exact search), scored on the validation set. Results are cached by F's weights,
    so stage I (F frozen) computes it once."""

    def __init__(self, cfg: Config, bank_images: torch.Tensor, vset: ValidationSet):
        self.cfg, self.bank_images, self.vset = cfg, bank_images, vset
        self._cache: dict[str, dict[str, float]] = {}

    def __call__(self, extractor: torch.nn.Module) -> dict[str, float]:
        from .bank.memory_bank import MemoryBank
        from .models.backbone import FeatureExtractor
        from .models.weights import load_into, state_dict_sha256
        from .patch_model import PatchModel
        from .pipeline import Detector

        sd = {k: v.detach().cpu() for k, v in extractor.body.state_dict().items()}
        key = state_dict_sha256(sd)
        if key not in self._cache:
            with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the caller's RNG
                f = FeatureExtractor(self.cfg.backbone.name, self.cfg.backbone.layers, "random")
            load_into(f.body, sd, "stage weights")
            model = PatchModel(f, self.cfg.bank.patch_size, device="cpu")
            rows = [model.embed(self.bank_images[i:i + 16])[0] for i in range(0, len(self.bank_images), 16)]
            bank = MemoryBank(np.concatenate(rows))
            det = Detector({}, self.cfg, model, bank, None)
            self._cache[key] = score_validation(det, self.vset)
        return dict(self._cache[key])


def metric_or_error(metric: str) -> str:
    if metric not in METRICS:
        raise ConfigError(f"search.metric must be one of {list(METRICS)}, got {metric!r}")
    return metric


__all__ = ["ValidationConfig", "ValidationSet", "QuickValidator", "holdout", "build_validation_set",
           "score_validation", "resolve_generator", "METRICS", "VALIDATION_GENERATORS"]

