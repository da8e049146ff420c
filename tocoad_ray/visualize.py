"""Heatmap overlays a person can look at (PIL + numpy only)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .fileio import atomic_write_bytes


def colormap(x: np.ndarray) -> np.ndarray:
    """[0, 1] → uint8 RGB, blue → cyan → yellow → red ("jet"-like, readable without matplotlib)."""
    x = np.clip(x, 0.0, 1.0)[..., None]
    stops = np.array([0.0, 0.35, 0.65, 1.0])
    cols = np.array([[0, 0, 160], [0, 200, 255], [255, 230, 0], [220, 0, 0]], dtype=np.float32)
    out = np.empty(x.shape[:-1] + (3,), dtype=np.float32)
    for c in range(3):
        out[..., c] = np.interp(x[..., 0], stops, cols[:, c])
    return out.astype(np.uint8)


def heatmap_overlay(image: np.ndarray, amap: np.ndarray, stats: dict[str, Any], threshold: float) -> np.ndarray:
    """Image | overlay side by side. The colour scale is fixed per artifact (normal median → 0,
    1.5 × threshold → 1), so the same colour means the same score across images."""
    lo = float(stats.get("q50", 0.0)) * 0.5
    hi = max(1.5 * threshold, lo + 1e-6)
    heat = colormap((amap - lo) / (hi - lo)).astype(np.float32)
    alpha = np.clip((amap - lo) / (hi - lo), 0.15, 0.7)[..., None]
    over = (image.astype(np.float32) * (1 - alpha) + heat * alpha).astype(np.uint8)
    # outline the pixels above threshold
    edge = amap >= threshold
    if edge.any():
        e = edge & ~(np.roll(edge, 1, 0) & np.roll(edge, -1, 0) & np.roll(edge, 1, 1) & np.roll(edge, -1, 1))
        over[e] = (255, 255, 255)
    h, w = image.shape[:2]
    canvas = np.full((h, 2 * w + 4, 3), 255, dtype=np.uint8)
    canvas[:, :w] = image
    canvas[:, w + 4:] = over
    return canvas


def save_png(path: str | Path, rgb: np.ndarray, caption: str | None = None) -> None:
    img = Image.fromarray(rgb)
    if caption:
        ImageDraw.Draw(img).text((4, 4), caption, fill=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def encode_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()
