"""One image's JSON answer (score, decision, optional heatmap): numpy and PIL only, so the ingress
(exported models) and the Backbone deployment (artifact models) build it the same way."""
from __future__ import annotations

import base64
from typing import Any, Callable

import numpy as np

from tocoad_ray.visualize import encode_png, heatmap_overlay


def _bins(n: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    i = np.arange(out)
    return (i * n) // out, -((-(i + 1) * n) // out)  # floor(i·n/out), ceil((i+1)·n/out)


def downsample(amap: np.ndarray, size: int) -> np.ndarray:
    """Area-average an [H, W] map to at most size x size cells (keeps the mean level, unlike
    striding); the bins of torch's ``adaptive_avg_pool2d``."""
    h, w = amap.shape
    if max(h, w) <= size:
        return amap
    a = np.asarray(amap, dtype=np.float64)
    c = np.zeros((h + 1, w + 1))
    c[1:, 1:] = a.cumsum(0).cumsum(1)  # summed-area table: any box sum in four lookups
    r0, r1 = _bins(h, min(h, size))
    c0, c1 = _bins(w, min(w, size))
    box = c[r1][:, c1] - c[r0][:, c1] - c[r1][:, c0] + c[r0][:, c0]
    return (box / np.outer(r1 - r0, c1 - c0)).astype(np.float32)


def result(info: dict[str, Any], score: float, amap: Callable[[], np.ndarray], image: Callable[[], np.ndarray],
           map_mode: str | None, threshold: float | None, settings: dict[str, Any]) -> dict[str, Any]:
    """One image's answer; ``amap`` / ``image`` (display uint8) are computed only for a map."""
    thr = float(threshold) if threshold is not None else info["threshold"]
    o = {"product": info["name"], "score": score, "anomalous": bool(score >= thr), "threshold": thr,
         "threshold_source": "request" if threshold is not None else info["threshold_source"],
         "model_version": info["version"], "model_created": info["created"],
         "shards": len(info["shards"]), "runtime": info.get("runtime", "ray")}
    if map_mode in ("png", "array"):
        m = amap()
        if map_mode == "png":
            o["map_png"] = base64.b64encode(encode_png(heatmap_overlay(image(), m, info["score_stats"], thr))).decode()
        else:
            small = downsample(m, settings["map_array_size"])
            o["map"] = np.round(small, 4).tolist()
            o["map_shape"] = list(small.shape)
            o["map_max"] = float(m.max())
    return o
