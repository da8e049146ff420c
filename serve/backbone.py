"""Feature extraction (F [+ ReConPatch g] + patch aggregation) as an autoscaled, batched deployment.

Products may use different backbones, so each artifact version is one multiplexed model; Serve
routes a product's requests to replicas that already hold its model, and ``@serve.batch`` splits
batches by multiplex id, so one forward pass never mixes models.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import torch
from ray import serve

from tocoad_ray.artifact import ArtifactError, read_meta
from tocoad_ray.config import Config, from_dict
from tocoad_ray.models.backbone import FeatureExtractor, resolve_device
from tocoad_ray.patch_model import PatchModel, load_adapter

from .shards import meta_sha


def backbone_id(artifact: str, sha: str) -> str:
    return f"{artifact}|{sha}"


def load_patch_model(mid: str) -> PatchModel:
    """The PatchModel of an artifact version: the same construction and weights check as
    ``tocoad_ray.pipeline.load_detector``, without loading the bank."""
    artifact, sha = mid.rsplit("|", 1)
    meta = read_meta(artifact, verify=True)
    if meta_sha(artifact) != sha:
        raise ArtifactError(f"{artifact} changed on disk since version {sha[:12]} was published")
    cfg = from_dict(Config, meta["config"])
    bb = meta["backbone"]
    weights = str(Path(artifact) / "backbone.safetensors") if bb.get("fine_tuned") else cfg.backbone.weights
    extractor = FeatureExtractor(bb["name"], bb["layers"], weights)
    if extractor.weights_sha256 != bb["weights_sha256"]:
        raise ArtifactError(f"{artifact}: backbone weights sha256 {extractor.weights_sha256[:12]}… differ from the "
                            f"{bb['weights_sha256'][:12]}… the bank was built with")
    ap = Path(artifact) / "adapter.safetensors"
    adapter = load_adapter(ap) if ap.is_file() else None
    return PatchModel(extractor, cfg.bank.patch_size, adapter=adapter, device=resolve_device(cfg.bank.device))


@serve.deployment(name="Backbone")
class Backbone:
    """[3, S, S] normalised image → patch rows [h·w, d] and grid (h, w); requests are batched."""

    def __init__(self, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01, torch_threads: int = 0):
        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self._embed_batch.set_max_batch_size(max_batch_size)
        self._embed_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: list[int] = []

    @serve.multiplexed(max_num_models_per_replica=4)
    async def get_model(self, mid: str) -> PatchModel:
        return await asyncio.to_thread(load_patch_model, mid)

    async def warm(self) -> dict:
        """Load the model of this request's multiplex id (the registry calls it before publishing)."""
        model = await self.get_model(serve.get_multiplexed_model_id())
        return {"device": str(model.device)}

    async def embed(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        return await self._embed_batch(image)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _embed_batch(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, tuple[int, int]]]:
        model = await self.get_model(serve.get_multiplexed_model_id())  # one id per batch
        x = torch.from_numpy(np.stack(images))
        self.batch_sizes = (self.batch_sizes + [len(images)])[-1000:]
        rows, (h, w) = await asyncio.to_thread(model.embed, x)
        P = h * w
        return [(rows[j * P:(j + 1) * P], (h, w)) for j in range(len(images))]

    async def stats(self) -> dict:
        bs = self.batch_sizes
        return {"batches": len(bs), "mean_batch_size": float(np.mean(bs)) if bs else 0.0}
