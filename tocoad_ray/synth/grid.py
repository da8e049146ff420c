"""Contact sheet of (I_G, y_G) pairs for checking generated masks by eye."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

from ..fileio import atomic_write

__all__ = ["save_grid", "grid_size"]

PAD = 4


def _outline(mask: np.ndarray) -> np.ndarray:
    m = np.pad(mask, 1, mode="constant")
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~inner


def grid_size(samples: Sequence[tuple[np.ndarray, np.ndarray]], cols: int = 8) -> tuple[int, int]:
    """(width, height) of the PNG ``save_grid`` writes: cells of (W + PAD) x (2H + PAD) for the
    largest H, W, plus a PAD margin; min(cols, n) columns."""
    n = len(samples)
    H = max(np.asarray(s[0]).shape[0] for s in samples)
    W = max(np.asarray(s[0]).shape[1] for s in samples)
    c = min(cols, n)
    r = math.ceil(n / cols)
    return PAD + c * (W + PAD), PAD + r * (2 * H + PAD)


def save_grid(samples: Sequence[tuple[np.ndarray, np.ndarray]], path: str, cols: int = 8) -> str:
    """Write one PNG: per sample the image on top and, beneath it, the image with the mask tinted
    red (50 %) and its outline in pure red. Atomic (temp file + os.replace). Returns ``path``."""
    if not samples:
        raise ValueError("save_grid needs at least one sample")
    width, height = grid_size(samples, cols)
    H = max(np.asarray(s[0]).shape[0] for s in samples)
    W = max(np.asarray(s[0]).shape[1] for s in samples)
    sheet = Image.new("RGB", (width, height), (40, 40, 40))
    red = np.array([255, 0, 0], np.float32)
    for i, (img, mask) in enumerate(samples):
        img = np.asarray(img)
        if img.ndim == 2:
            img = img[..., None]
        if img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        img = img[..., :3].astype(np.uint8)
        mask = np.asarray(mask, bool)
        over = img.astype(np.float32)
        over[mask] = 0.5 * over[mask] + 0.5 * red
        over[_outline(mask)] = red
        r, c = divmod(i, cols)
        x = PAD + c * (W + PAD)
        y = PAD + r * (2 * H + PAD)
        sheet.paste(Image.fromarray(img), (x, y))
        sheet.paste(Image.fromarray(np.rint(over).astype(np.uint8)), (x, y + H))
    atomic_write(path, lambda p: sheet.save(p, format="PNG"))
    return path
