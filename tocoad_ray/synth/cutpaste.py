"""CutPaste pseudo-anomalies (Li et al. 2021) as an alternative G (ToCoAD Table 7), with the pasted
region as the pixel mask y_G."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance

from .base_image import begin_anomaly, finish_anomaly, is_gray, to_gray3

__all__ = ["cutpaste", "color_jitter"]


def color_jitter(patch: np.ndarray, rng: np.random.Generator, strength: float = 0.1) -> np.ndarray:
    """torchvision-style ColorJitter(brightness, contrast, saturation, hue = strength), PIL-based,
    fixed order brightness -> contrast -> saturation -> hue."""
    if strength <= 0:
        return patch
    im = Image.fromarray(patch)
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(1 - strength, 1 + strength))
    im = ImageEnhance.Contrast(im).enhance(rng.uniform(1 - strength, 1 + strength))
    im = ImageEnhance.Color(im).enhance(rng.uniform(1 - strength, 1 + strength))
    shift = int(round(rng.uniform(-strength, strength) * 255))
    if shift:
        hsv = np.asarray(im.convert("HSV")).copy()
        hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 256).astype(np.uint8)
        im = Image.fromarray(hsv, "HSV").convert("RGB")
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def cutpaste(image: np.ndarray, rng: np.random.Generator, variant: str = "normal",
             normal_prob: float = 0.5, area_ratio: tuple[float, float] = (0.02, 0.15),
             aspect_ratio: tuple[float, float] = (0.3, 3.3), scar_width: tuple[int, int] = (2, 16),
             scar_length: tuple[int, int] = (10, 25), scar_angle: tuple[float, float] = (-45.0, 45.0),
             jitter: float = 0.1, rotate: bool = False, max_angle: float = 10.0,
             return_base: bool = False):
    """CutPaste G(I) -> (I_G, y_G) [, base].

    ``variant="normal"``: a rectangle of area U(area_ratio)*H*W and aspect ratio log-uniform in
    ``aspect_ratio``, colour-jittered, pasted at an independent random location; y_G = that
    rectangle. ``variant="scar"``: a thin patch (width U{scar_width}, length U{scar_length} px),
    jittered, rotated by U(scar_angle) degrees (nearest-neighbour, so the footprint is exact) and
    pasted; y_G = its rotated footprint. ``rotate`` applies ToCoAD's base rotation first.
    y_G may contain pixels whose value happens not to change; no pixel outside y_G changes.
    """
    if variant not in ("normal", "scar"):
        raise ValueError(f"unknown cutpaste variant {variant!r}")
    base, out, mask, restore, anomalous = begin_anomaly(image, rng, rotate, max_angle, normal_prob)
    H, W = base.shape[:2]
    if anomalous:
        gray = is_gray(base)
        if variant == "normal":
            area = rng.uniform(*area_ratio) * H * W
            ar = math.exp(rng.uniform(math.log(aspect_ratio[0]), math.log(aspect_ratio[1])))
            pw = int(np.clip(round(math.sqrt(area * ar)), 1, W))
            ph = int(np.clip(round(math.sqrt(area / ar)), 1, H))
            sy, sx = int(rng.integers(0, H - ph + 1)), int(rng.integers(0, W - pw + 1))
            patch = color_jitter(np.ascontiguousarray(base[sy:sy + ph, sx:sx + pw]), rng, jitter)
            if gray:
                patch = to_gray3(patch)
            ty, tx = int(rng.integers(0, H - ph + 1)), int(rng.integers(0, W - pw + 1))
            out[ty:ty + ph, tx:tx + pw] = patch
            mask[ty:ty + ph, tx:tx + pw] = True
        else:
            pw = int(min(rng.integers(scar_width[0], scar_width[1] + 1), W))
            ph = int(min(rng.integers(scar_length[0], scar_length[1] + 1), H))
            sy, sx = int(rng.integers(0, H - ph + 1)), int(rng.integers(0, W - pw + 1))
            patch = color_jitter(np.ascontiguousarray(base[sy:sy + ph, sx:sx + pw]), rng, jitter)
            if gray:
                patch = to_gray3(patch)
            rgba = np.concatenate([patch, np.full((ph, pw, 1), 255, np.uint8)], axis=2)
            rot = np.asarray(Image.fromarray(rgba, "RGBA").rotate(
                float(rng.uniform(*scar_angle)), resample=Image.NEAREST, expand=True))
            rot = rot[:H, :W]  # only matters for images smaller than the rotated scar
            fp = rot[..., 3] > 0
            if not fp.any():  # degenerate (cannot happen for >= 1 px patches, kept for safety)
                fp[0, 0] = True
            rh, rw = fp.shape
            ty, tx = int(rng.integers(0, H - rh + 1)), int(rng.integers(0, W - rw + 1))
            region = out[ty:ty + rh, tx:tx + rw]
            region[fp] = rot[..., :3][fp]
            mask[ty:ty + rh, tx:tx + rw] = fp
    return finish_anomaly(out, mask, base, restore, return_base)
