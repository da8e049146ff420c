"""The bank's training features through Ray Data: an actor pool of ``PatchModel``s (F + 3×3
aggregation, on a GPU when the actors get one) maps the training images to patch rows; the driver
gathers them in image-major order and checks that every image came back exactly once, so the
matrix equals the single-process ``pipeline.extract`` whatever the number of actors."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..config import Config, from_dict
from .samples import configure_data_context


class PatchEmbedder:
    """``map_batches`` actor: {"row", "path"} → {"row", "features" [B, h·w, d], "h", "w"}."""

    def __init__(self, cfg: dict[str, Any], weights: str, device: str = "auto"):
        from ..data import Preprocess
        from ..models.backbone import FeatureExtractor, resolve_device
        from ..patch_model import PatchModel

        self.cfg = from_dict(Config, cfg)
        c = self.cfg
        # as load_detector: weights="random" (tests) rebuilds the seeded network fit built
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            extractor = FeatureExtractor(c.backbone.name, c.backbone.layers, weights)
        self.weights_sha256 = extractor.weights_sha256
        self.preprocess = Preprocess(c.data, extractor.mean, extractor.std)
        self.model = PatchModel(extractor, c.bank.patch_size, device=resolve_device(device), fast=c.backbone.fast_inference)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from ..data import read_image

        x = torch.stack([self.preprocess.image(read_image(Path(p))) for p in batch["path"]])
        rows, (h, w) = self.model.embed(x)
        n = len(x)
        return {"row": batch["row"], "features": rows.reshape(n, h * w, -1), "h": np.full(n, h), "w": np.full(n, w)}


def extract_features(paths: Sequence[str | Path], cfg: Config, weights: str, actors: int = 1, use_gpu: bool = False,
                     cpus: float = 1.0) -> tuple[np.ndarray, tuple[int, int]]:
    """All patch rows of ``paths`` (image-major: image i's rows are [i·h·w, (i+1)·h·w)) and (h, w).
    ``actors`` 0: the same ``PatchEmbedder`` in this process, batch by batch."""
    if actors == 0:
        return _extract_here(paths, cfg, weights, "cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    import ray
    from ray.data import ActorPoolStrategy

    configure_data_context()
    n = len(paths)
    ds = ray.data.from_items([{"row": i, "path": str(p)} for i, p in enumerate(paths)])
    ds = ds.map_batches(PatchEmbedder, fn_constructor_kwargs={"cfg": cfg.to_dict(), "weights": weights,
                                                              "device": "cuda" if use_gpu else "cpu"},
                        batch_size=cfg.bank.batch_for("cuda" if use_gpu else "cpu"), compute=ActorPoolStrategy(size=actors),
                        num_cpus=cpus, num_gpus=1 if use_gpu else 0,
                        **({"resources": cfg.distributed.worker_resources} if cfg.distributed.worker_resources else {}))
    parts: dict[int, np.ndarray] = {}
    grid = None
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for r, f, h, w in zip(batch["row"], batch["features"], batch["h"], batch["w"]):
            if int(r) in parts:
                raise RuntimeError(f"feature rows of image {int(r)} ({paths[int(r)]}) came back twice")
            parts[int(r)] = f
            grid = (int(h), int(w))
    missing = sorted(set(range(n)) - set(parts))
    if missing:
        raise RuntimeError(f"feature rows of {len(missing)} images are missing (first: {paths[missing[0]]})")
    return np.concatenate([parts[i] for i in range(n)]).astype(np.float32, copy=False), grid


def _extract_here(paths: Sequence[str | Path], cfg: Config, weights: str, device: str) -> tuple[np.ndarray, tuple[int, int]]:
    embed = PatchEmbedder(cfg.to_dict(), weights, device)
    parts, grid, bs = [], None, cfg.bank.batch_for(device)
    for i in range(0, len(paths), bs):
        out = embed({"row": np.arange(i, min(i + bs, len(paths))), "path": np.array([str(p) for p in paths[i:i + bs]])})
        parts.append(out["features"].reshape(-1, out["features"].shape[-1]))
        grid = (int(out["h"][0]), int(out["w"][0]))
    return np.concatenate(parts).astype(np.float32, copy=False), grid
