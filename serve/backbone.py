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
from .sources import remember


def backbone_id(artifact: str, sha: str) -> str:
    return f"{artifact}|{sha}"


def load_patch_model(mid: str, device: str | None = None) -> PatchModel:
    """The PatchModel of an artifact version from disk: the same construction and weights check
    as ``tocoad_ray.pipeline.load_detector``, without loading the bank."""
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
    return PatchModel(extractor, cfg.bank.patch_size, adapter=adapter, device=resolve_device(device or cfg.bank.device),
                      fast=cfg.backbone.fast_inference)


def model_bundle(model: PatchModel, device: str) -> dict:
    """A verified PatchModel as plain arrays, for the object store: a replica that starts later
    rebuilds exactly this version, whatever happened to the files since."""
    ex = model.extractor
    return {"name": ex.name, "layers": list(ex.layers), "patch_size": model.patch_size, "device": device,
            "fast": model.fast,
            "weights_sha256": ex.weights_sha256,
            "body": {k: v.detach().cpu().numpy() for k, v in ex.body.state_dict().items()},
            "adapter": None if model.adapter is None else
            {k: v.detach().cpu().numpy() for k, v in model.adapter.state_dict().items()}}


def model_from_bundle(bundle: dict) -> PatchModel:
    from tocoad_ray.models.reconpatch import PatchAdapter
    from tocoad_ray.models.weights import load_into

    with torch.random.fork_rng(devices=[]):  # the random init is overwritten below
        extractor = FeatureExtractor(bundle["name"], bundle["layers"], "random")
    load_into(extractor.body, {k: torch.from_numpy(np.array(v)) for k, v in bundle["body"].items()}, "object store")
    if extractor.refresh_checksum() != bundle["weights_sha256"]:
        raise ArtifactError("backbone weights from the object store do not match their checksum")
    adapter = None if bundle["adapter"] is None else PatchAdapter.from_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in bundle["adapter"].items()})
    return PatchModel(extractor, bundle["patch_size"], adapter=adapter, device=resolve_device(bundle["device"]),
                      fast=bundle.get("fast", False))


@serve.deployment(name="Backbone")
class Backbone:
    """[3, S, S] normalised image → patch rows [h·w, d] and grid (h, w); requests are batched."""

    def __init__(self, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01, torch_threads: int = 0):
        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self._embed_batch.set_max_batch_size(max_batch_size)
        self._embed_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: list[int] = []
        self._sources: dict = {}  # multiplex id -> ObjectRef of its model bundle

    @serve.multiplexed(max_num_models_per_replica=4)
    async def get_model(self, mid: str) -> PatchModel:
        # the version the registry verified and put in the object store (never re-read from disk)
        bundle = await self._sources[mid]
        return await asyncio.to_thread(model_from_bundle, bundle)

    def _remember(self, mid: str, source: list) -> None:
        remember(self._sources, mid, source[0])  # [ObjectRef]: the list keeps Ray from resolving it in transit

    async def warm(self, source: list) -> dict:
        """Load the model of this request's multiplex id (the registry calls it before publishing)."""
        mid = serve.get_multiplexed_model_id()
        self._remember(mid, source)
        model = await self.get_model(mid)
        return {"device": str(model.device)}

    async def embed(self, image: np.ndarray, source: list) -> tuple[np.ndarray, tuple[int, int]]:
        self._remember(serve.get_multiplexed_model_id(), source)
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
