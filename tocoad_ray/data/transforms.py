"""Image/mask preprocessing with one shared geometry, so a mask always lands on the pixels of its image."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..config import DataConfig
from .geometry import resize_crop_geometry
from .samples import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Preprocess:
    """Resize (+ centre crop) and normalise images; apply the identical geometry to masks.

    ``keep_aspect=False``: squash to ``image_size``x``image_size``. ``keep_aspect=True``: scale the
    short side to ``image_size``; then centre crop to ``crop_size`` (or to ``image_size`` when
    ``crop_size`` is None, so the output is always ``cfg.input_size`` square).
    """

    def __init__(self, cfg: DataConfig, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std must have 3 values, got {mean!r}, {std!r}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {std!r}")
        self.cfg = cfg
        self.size = cfg.input_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    # --- geometry shared by image and mask -------------------------------------------------------
    def geometry(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(resized_h, resized_w, crop_top, crop_left) for an input of h x w."""
        return resize_crop_geometry(h, w, self.cfg.image_size, self.size, self.cfg.keep_aspect)

    def _warp(self, t: torch.Tensor, mode: str) -> torch.Tensor:
        """CxHxW float -> CxSxS via resize then centre crop."""
        _, h, w = t.shape
        rh, rw, top, left = self.geometry(h, w)
        if (rh, rw) != (h, w):  # skip identity resizes: exact and faster
            if mode == "bilinear":
                t = F.interpolate(t[None], size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)[0]
            else:
                # nearest-exact samples pixel centres like bilinear(align_corners=False) -> no half-pixel shift
                t = F.interpolate(t[None], size=(rh, rw), mode="nearest-exact")[0]
        return t[:, top : top + self.size, left : left + self.size]

    # --- public ----------------------------------------------------------------------------------
    def image(self, rgb: np.ndarray) -> torch.Tensor:
        """uint8 HxWx3 (or HxW) -> normalised float 3xSxS."""
        if rgb.ndim == 2:
            rgb = np.repeat(rgb[..., None], 3, axis=2)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise DataError(f"expected an HxWx3 image, got shape {rgb.shape}")
        t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255.0)
        t = self._warp(t, "bilinear").clamp_(0.0, 1.0)  # antialias can overshoot slightly
        return (t - self.mean) / self.std

    def mask(self, mask: np.ndarray, expected_hw: tuple[int, int] | None = None, path: str | Path | None = None) -> torch.Tensor:
        """bool HxW -> float 1xSxS of 0/1. ``expected_hw``: the image's size; a mismatch is a DataError."""
        where = f"mask {path}" if path is not None else "mask"
        if mask.ndim != 2:
            raise DataError(f"{where} must be 2-D, got shape {mask.shape}")
        if expected_hw is not None and tuple(mask.shape) != tuple(expected_hw):
            raise DataError(f"{where} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image is "
                            f"{expected_hw[1]}x{expected_hw[0]}")
        t = torch.from_numpy(np.ascontiguousarray(mask != 0)).float()[None]
        return self._warp(t, "nearest")

    def denormalize(self, t: torch.Tensor) -> np.ndarray:
        """Normalised 3xHxW (or 1x3xHxW) tensor -> uint8 HxWx3 for display."""
        t = t.detach().cpu().float()
        if t.ndim == 4:
            t = t[0]
        x = (t * self.std + self.mean).clamp(0.0, 1.0)
        return (x.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
