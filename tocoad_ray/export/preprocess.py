"""The artifact's image preprocessing in numpy, equal to ``data.transforms.Preprocess.image``.

torch's antialiased bilinear resize (``F.interpolate(..., antialias=True)``, PIL's triangle filter)
is separable: per axis a fixed [out, in] weight matrix, so resize + centre crop is two matrix
products with the kept rows of each matrix. No torch, so an edge box needs only numpy.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

from ..data.geometry import resize_crop_geometry


@functools.lru_cache(maxsize=32)
def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] float32 weights of torch's antialiased bilinear resize along one axis
    (``_upsample_bilinear2d_aa``: support scaled by the reduction, weights clipped at the borders
    and normalised), computed with torch's float32 steps so the weights are bit-equal."""
    f32 = np.float32
    scale = f32(n_in / n_out)
    support = scale if scale >= 1.0 else f32(1.0)  # interp_size / 2 = 1 for bilinear
    inv = f32(1.0 / float(scale)) if scale >= 1.0 else f32(1.0)
    m = np.zeros((n_out, n_in), dtype=np.float32)
    for i in range(n_out):
        center = f32(float(scale) * (i + 0.5))
        lo = max(int(float(f32(center - support)) + 0.5), 0)  # float32 difference, then + 0.5 in double
        hi = min(int(float(f32(center + support)) + 0.5), n_in)
        x = np.abs((((np.arange(lo, hi) - center).astype(f32).astype(np.float64) + 0.5) * float(inv)).astype(f32))
        w = np.where(x < 1, f32(1.0) - x, f32(0.0)).astype(f32)
        total = f32(0.0)
        for v in w:  # torch sums in order, in float32
            total = f32(total + v)
        m[i, lo:hi] = w / total if total != 0 else w
    return m


class ImagePreprocess:
    """uint8 HxWx3 (or HxW) → normalised float32 3xSxS, as the artifact's ``Preprocess``."""

    def __init__(self, image_size: int, crop_size: int | None, keep_aspect: bool,
                 mean: Sequence[float], std: Sequence[float]):
        self.image_size = int(image_size)
        self.size = int(crop_size or image_size)
        self.keep_aspect = bool(keep_aspect)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImagePreprocess":
        return cls(d["image_size"], d["crop_size"], d["keep_aspect"], d["mean"], d["std"])

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        if rgb.ndim == 2:
            rgb = np.repeat(rgb[..., None], 3, axis=2)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 image, got shape {rgb.shape}")
        h, w = rgb.shape[:2]
        rh, rw, top, left = resize_crop_geometry(h, w, self.image_size, self.size, self.keep_aspect)
        t = np.ascontiguousarray(rgb.transpose(2, 0, 1)).astype(np.float32) / np.float32(255.0)
        if (rh, rw) != (h, w):  # the torch path skips identity resizes too
            mh = resize_matrix(h, rh)[top: top + self.size]
            mw = resize_matrix(w, rw)[left: left + self.size]
            t = np.clip(mh @ t @ mw.T, 0.0, 1.0)  # antialias can overshoot slightly
        else:
            t = t[:, top: top + self.size, left: left + self.size]
        return ((t - self.mean) / self.std).astype(np.float32)
