"""Training images decoded and resized once, as uint8 arrays, before any epoch."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as Fn

from ..data import Preprocess, read_image


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
