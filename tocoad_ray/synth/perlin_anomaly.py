"""ToCoAD anomaly generator G with Perlin noise (§3.1, Fig. 3, eq. 1).

I -> I_R (small + k*90 degree rotation), Perlin mask P, texture A (augmented), anomalous region
A_P = P & A, fused with I_R: I_G = I_R*(1-m) + (1-beta)*A*m + beta*I_R*m, beta ~ U(beta_range);
y_G = m. Pixels are only written inside m, so no pixel outside y_G changes; a masked pixel may
keep its value when the blend happens to reproduce it (e.g. identical colours).
"""
from __future__ import annotations

import numpy as np

from .base_image import begin_anomaly, finish_anomaly, is_gray, to_gray3
from .perlin import perlin_mask
from .textures import TextureSource, augment_texture

__all__ = ["perlin_anomaly"]

_DEFAULT_TEXTURES: TextureSource | None = None


def _default_textures() -> TextureSource:
    global _DEFAULT_TEXTURES
    if _DEFAULT_TEXTURES is None:
        _DEFAULT_TEXTURES = TextureSource()
    return _DEFAULT_TEXTURES


def perlin_anomaly(image: np.ndarray, rng: np.random.Generator, textures: TextureSource | None = None,
                   normal_prob: float = 0.5, beta_range: tuple[float, float] = (0.0, 0.8),
                   rotate: bool = True, max_angle: float = 10.0, threshold: float = 0.5,
                   min_scale: int = 0, max_scale: int = 6, return_base: bool = False):
    """G(I) -> (I_G uint8, y_G bool HxW) [, I_R if ``return_base``].

    ``textures`` defaults to procedural textures. With probability ``normal_prob`` I_R is returned
    unchanged with an all-False mask. Textures are converted to grey for grey images.
    """
    base, out, mask, restore, anomalous = begin_anomaly(image, rng, rotate, max_angle, normal_prob)
    H, W = base.shape[:2]
    if anomalous:
        mask = perlin_mask((H, W), rng, min_scale=min_scale, max_scale=max_scale, threshold=threshold)
        tex = augment_texture((textures or _default_textures()).sample(rng, (H, W)), rng)
        if is_gray(base):
            tex = to_gray3(tex)
        beta = float(rng.uniform(*beta_range))
        blended = (1.0 - beta) * tex[mask].astype(np.float32) + beta * base[mask].astype(np.float32)
        out[mask] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return finish_anomaly(out, mask, base, restore, return_base)
