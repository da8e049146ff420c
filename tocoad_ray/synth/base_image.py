"""The base image every G starts from: image layouts (RGB / grey), the base rotation I -> I_R (ToCoAD
Fig. 3) and the start and finish shared by every generator."""
from __future__ import annotations

from typing import Callable

import math

import numpy as np
from PIL import Image

__all__ = ["rotate_base", "rotate_reflect", "as_rgb", "is_gray", "to_gray3", "begin_anomaly", "finish_anomaly"]


def as_rgb(image: np.ndarray) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Return (uint8 HxWx3 view/copy, restore) where ``restore`` maps an HxWx3 result back to the
    input's layout (HxW, HxWx1 or HxWx3). Grey layouts are restored with integer luma
    (299R + 587G + 114B) / 1000, which is exact for R = G = B."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise TypeError(f"expected uint8 image, got {img.dtype}")
    if img.ndim == 2:
        return np.repeat(img[..., None], 3, axis=2), lambda x: _luma(x)
    if img.ndim == 3 and img.shape[2] == 1:
        return np.repeat(img, 3, axis=2), lambda x: _luma(x)[..., None]
    if img.ndim == 3 and img.shape[2] == 3:
        return img, lambda x: x
    if img.ndim == 3 and img.shape[2] == 4:
        return np.ascontiguousarray(img[..., :3]), lambda x: x
    raise ValueError(f"unsupported image shape {img.shape}")


def _luma(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint32)
    return ((299 * x[..., 0] + 587 * x[..., 1] + 114 * x[..., 2] + 500) // 1000).astype(np.uint8)


def is_gray(img: np.ndarray) -> bool:
    """True when an HxWx3 image has identical channels (grayscale stored as RGB)."""
    return bool(np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2]))


def to_gray3(img: np.ndarray) -> np.ndarray:
    """Luma replicated to 3 channels (used so synthetic content on grey images stays grey)."""
    return np.repeat(_luma(img)[..., None], 3, axis=2)


def rotate_reflect(arr: np.ndarray, angle: float) -> np.ndarray:
    """Rotate a uint8 HxW[x3] or float32 HxW array by ``angle`` degrees about its centre, bilinear,
    same shape, border filled by reflection (reflect-pad enough margin, PIL rotate, crop)."""
    H, W = arr.shape[:2]
    margin = int(math.ceil(math.hypot(H, W) * abs(math.sin(math.radians(angle) / 2)))) + 2
    pad = [(margin, margin), (margin, margin)] + [(0, 0)] * (arr.ndim - 2)
    padded = np.pad(arr, pad, mode="symmetric")
    if arr.dtype == np.uint8:
        im = Image.fromarray(padded)
    else:
        im = Image.fromarray(padded.astype(np.float32), "F")
    rot = np.asarray(im.rotate(angle, resample=Image.BILINEAR))
    return np.ascontiguousarray(rot[margin:margin + H, margin:margin + W]).astype(arr.dtype, copy=False)


def rotate_base(image: np.ndarray, rng: np.random.Generator, max_angle: float = 10.0,
                rot90: bool = True) -> np.ndarray:
    """I -> I_R: rotation by U(-max_angle, max_angle) degrees (bilinear, reflected border), then a
    random k*90 degree rotation. For non-square images k is drawn from {0, 2} so that the shape is
    preserved. Always consumes the same rng draws (deterministic per seed)."""
    img = np.asarray(image)
    angle = float(rng.uniform(-max_angle, max_angle)) if max_angle > 0 else 0.0
    k = int(rng.integers(4)) if rot90 else 0
    if angle != 0.0:
        img = rotate_reflect(img, angle)
    if img.shape[0] != img.shape[1]:
        k = 2 * (k % 2)
    if k:
        img = np.rot90(img, k, axes=(0, 1))
    return np.ascontiguousarray(img)


def begin_anomaly(image: np.ndarray, rng: np.random.Generator, rotate: bool, max_angle: float,
                  normal_prob: float):
    """Common start of every G: -> (base, out, mask, restore, anomalous).

    ``base`` is I_R (``rotate_base`` when ``rotate``, else an RGB copy of ``image``), ``out`` a copy
    of it to paint into, ``mask`` an all-False HxW y_G, ``restore`` maps RGB back to the input's
    layout (see ``as_rgb``), and ``anomalous`` is False with probability ``normal_prob``. The rng
    draws (rotation, then one uniform) are the same for every generator."""
    img, restore = as_rgb(image)
    base = rotate_base(img, rng, max_angle) if rotate else img.copy()
    out = base.copy()
    mask = np.zeros(base.shape[:2], bool)
    return base, out, mask, restore, bool(rng.random() >= normal_prob)


def finish_anomaly(out: np.ndarray, mask: np.ndarray, base: np.ndarray,
                   restore: Callable[[np.ndarray], np.ndarray], return_base: bool):
    """(I_G, y_G) in the input's layout, plus I_R when ``return_base``."""
    res = (restore(out), mask)
    return res + (restore(base),) if return_base else res
