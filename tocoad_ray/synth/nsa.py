"""NSA-style seamless (Poisson-blended) patches (Schlüter et al. 2022) as an alternative G
(ToCoAD Table 7). cv2.seamlessClone is replaced by an exact DST-based Poisson solver on the
rectangular patch: f = g + h with h harmonic inside and h = target - g on the patch border, i.e.
Laplacian(f) = Laplacian(g) inside with f = target on the border (source-gradient guidance).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image
from scipy import fft

from .base_image import as_rgb, begin_anomaly, finish_anomaly, is_gray, to_gray3

__all__ = ["nsa", "poisson_blend"]


def poisson_blend(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Seamlessly blend ``source`` into ``target`` (same shape h x w [x C], h, w >= 3), float32.

    Border pixels keep the target value; the interior keeps the source gradients. Solved exactly
    with a type-I DST (Dirichlet Laplacian diagonalisation), O(hw log hw)."""
    g = source.astype(np.float32)
    d = target.astype(np.float32) - g  # boundary values of the correction h
    h, w = g.shape[:2]
    m, n = h - 2, w - 2
    out = target.astype(np.float32).copy()
    if m < 1 or n < 1:
        return out
    b = np.zeros((m, n) + g.shape[2:], np.float64)
    b[0] += d[0, 1:-1]
    b[-1] += d[-1, 1:-1]
    b[:, 0] += d[1:-1, 0]
    b[:, -1] += d[1:-1, -1]
    ly = 2.0 - 2.0 * np.cos(np.pi * np.arange(1, m + 1) / (m + 1))
    lx = 2.0 - 2.0 * np.cos(np.pi * np.arange(1, n + 1) / (n + 1))
    lam = ly[:, None] + lx[None, :]
    if b.ndim == 3:
        lam = lam[..., None]
    corr = fft.idstn(fft.dstn(b, type=1, axes=(0, 1)) / lam, type=1, axes=(0, 1))
    out[1:-1, 1:-1] = g[1:-1, 1:-1] + corr.astype(np.float32)
    return out


def nsa(image: np.ndarray, rng: np.random.Generator, sources: Sequence[np.ndarray] | None = None,
        normal_prob: float = 0.5, patch_frac: tuple[float, float] = (0.05, 0.4),
        max_patch: int = 64, diff_threshold: int = 8, min_changed: float = 0.1,
        max_tries: int = 10, rotate: bool = False, max_angle: float = 10.0,
        return_base: bool = False):
    """NSA G(I) -> (I_G, y_G) [, base].

    A patch (each side U{frac*dim}, capped at ``max_patch`` px) from a random image of
    ``sources`` (resized to the base size) or, without sources, from the image itself, is Poisson
    blended at a random location. y_G = pixels whose max channel change exceeds ``diff_threshold``;
    smaller changes are reverted, so y_G is exactly the set of changed pixels. Redrawn while fewer
    than ``min_changed`` of the patch changes (``max_tries``); as a last resort the inverted target
    patch is pasted (y_G = changed pixels). The object-placement heuristics and patch rescaling of
    the NSA paper are left out.
    """
    base, out, mask, restore, anomalous = begin_anomaly(image, rng, rotate, max_angle, normal_prob)
    H, W = base.shape[:2]
    if anomalous:
        gray = is_gray(base)

        def side(dim):
            lo = max(3, int(round(patch_frac[0] * dim)))
            hi = max(lo, min(max_patch, int(round(patch_frac[1] * dim)), dim))
            return int(rng.integers(lo, hi + 1)) if lo <= dim else dim

        done = False
        for _ in range(max_tries):
            if sources:
                src, _r = as_rgb(sources[int(rng.integers(len(sources)))])
                if src.shape[:2] != (H, W):
                    src = np.asarray(Image.fromarray(src).resize((W, H), Image.BILINEAR))
            else:
                src = base
            if gray and not is_gray(src):
                src = to_gray3(src)
            ph, pw = side(H), side(W)
            sy, sx = int(rng.integers(0, H - ph + 1)), int(rng.integers(0, W - pw + 1))
            ty, tx = int(rng.integers(0, H - ph + 1)), int(rng.integers(0, W - pw + 1))
            tgt = base[ty:ty + ph, tx:tx + pw]
            blended = np.clip(np.rint(poisson_blend(src[sy:sy + ph, sx:sx + pw], tgt)), 0, 255).astype(np.uint8)
            changed = np.abs(blended.astype(np.int16) - tgt.astype(np.int16)).max(axis=2) > diff_threshold
            if changed.mean() >= min_changed:
                done = True
                break
        if not done and not changed.any():
            blended = 255 - tgt  # guaranteed change (255 - v != v for integers)
            changed = np.ones(tgt.shape[:2], bool)
        region = out[ty:ty + ph, tx:tx + pw]
        region[changed] = blended[changed]
        mask[ty:ty + ph, tx:tx + pw] = changed
    return finish_anomaly(out, mask, base, restore, return_base)
