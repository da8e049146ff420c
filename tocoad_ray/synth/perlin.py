"""2-D Perlin noise and Perlin masks for the anomaly generator G (ToCoAD §3.1, Fig. 3: noise P).

Vectorised numpy port of DRAEM's ``rand_perlin_2d_np``: random unit gradients on a ``res`` grid,
quintic fade 6t^5 - 15t^4 + 10t^3, bilinear mix of the four corner dot products, scaled by sqrt(2).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = ["perlin_noise", "fractal_noise", "perlin_mask"]


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(shape: tuple[int, int], res: tuple[int, int] | int,
                 rng: np.random.Generator) -> np.ndarray:
    """Perlin noise of ``shape`` (H, W) with ``res`` (ry, rx) gradient cells per axis, float32.

    Values lie roughly in [-1, 1]. When H (W) is not divisible by ry (rx), the noise is
    generated on the next multiple and cropped (as DRAEM requires divisibility).
    """
    H, W = int(shape[0]), int(shape[1])
    ry, rx = (int(res), int(res)) if np.isscalar(res) else (int(res[0]), int(res[1]))
    ry, rx = max(1, ry), max(1, rx)
    dy = -(-H // ry)  # cell size on the padded grid (Hp = ry * dy >= H)
    dx = -(-W // rx)
    angles = (2.0 * math.pi) * rng.random((ry + 1, rx + 1))
    gy, gx = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    ys, xs = np.arange(H), np.arange(W)
    iy, ix = ys // dy, xs // dx
    fy = ((ys % dy) / dy).astype(np.float32)[:, None]
    fx = ((xs % dx) / dx).astype(np.float32)[None, :]
    iy0, iy1, ix0, ix1 = iy[:, None], iy[:, None] + 1, ix[None, :], ix[None, :] + 1

    def dot(ia, ib, sy, sx):
        return gy[ia, ib] * (fy + sy) + gx[ia, ib] * (fx + sx)

    n00 = dot(iy0, ix0, 0.0, 0.0)
    n10 = dot(iy1, ix0, -1.0, 0.0)
    n01 = dot(iy0, ix1, 0.0, -1.0)
    n11 = dot(iy1, ix1, -1.0, -1.0)
    ty, tx = _fade(fy), _fade(fx)
    a = n00 + ty * (n10 - n00)
    b = n01 + ty * (n11 - n01)
    return (math.sqrt(2.0) * (a + tx * (b - a))).astype(np.float32)


def _clip_res(res: int, dim: int) -> int:
    # Cells must span >= 2 pixels, else every pixel sits on a lattice point where noise == 0.
    return int(max(1, min(res, dim // 2)))


def fractal_noise(shape: tuple[int, int], rng: np.random.Generator, res: tuple[int, int] = (4, 4),
                  octaves: int = 3, persistence: float = 0.5) -> np.ndarray:
    """Sum of ``octaves`` Perlin layers with doubling frequency; normalised to [0, 1]."""
    H, W = shape
    out = np.zeros((H, W), np.float32)
    amp = 1.0
    for o in range(octaves):
        r = (_clip_res(res[0] * 2 ** o, H), _clip_res(res[1] * 2 ** o, W))
        out += amp * perlin_noise((H, W), r, rng)
        amp *= persistence
    lo, hi = float(out.min()), float(out.max())
    return (out - lo) / (hi - lo + 1e-8)


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, min_scale: int = 0,
                max_scale: int = 6, threshold: float = 0.5, rotate: bool = True,
                max_tries: int = 50) -> np.ndarray:
    """Boolean Perlin mask (DRAEM): scale 2^U{min..max-1} per axis independently, noise rotated by
    U(-90, 90) degrees, thresholded at ``threshold``. Redrawn until non-empty; after ``max_tries``
    empty draws the arg-max pixel region of the last noise is used (never returns an empty mask).
    """
    H, W = int(shape[0]), int(shape[1])
    noise = None
    for _ in range(max_tries):
        sy = 2 ** int(rng.integers(min_scale, max_scale))
        sx = 2 ** int(rng.integers(min_scale, max_scale))
        noise = perlin_noise((H, W), (_clip_res(sy, H), _clip_res(sx, W)), rng)
        if rotate:
            angle = float(rng.uniform(-90.0, 90.0))
            noise = ndimage.rotate(noise, angle, reshape=False, order=1, mode="reflect")
        mask = noise > threshold
        if mask.any():
            return mask
    return noise >= noise.max()
