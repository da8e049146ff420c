"""The model side of scoring as one autoscaled, batched deployment: decode → F [+ ReConPatch g] and
patch aggregation → one k-NN fan-out to the product's ``BankShard`` shards → eq. 8/9 and the maps.
A product whose bank is one small shard (``local_bank_max_mb``) is searched right here instead:
the hop to another process would cost more than the search.

Requests from many clients meet here: a ``Coalescer`` stacks their images into one forward pass
and one search call per shard, so a single-image request costs what a batch row costs. The
ingress sends the upload's bytes and gets the finished answer back: an image is decoded once, and
neither images nor patch rows travel between deployments (only queries to the shards).

Products may use different backbones, so each artifact version is one multiplexed model; Serve
routes a product's requests to replicas that already hold its model, and a batch holds one
multiplex id, so one forward pass never mixes models.
"""
from __future__ import annotations

import asyncio
import collections
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from ray import serve

from tocoad_ray.artifact import ArtifactError
from tocoad_ray.bank.scoring import anomaly_maps, score_patches
from tocoad_ray.config import Config, DataConfig, from_dict
from tocoad_ray.data import DataError, Preprocess
from tocoad_ray.data.image_io import decode_image_bytes
from tocoad_ray.models.backbone import FeatureExtractor, resolve_device
from tocoad_ray.patch_model import PatchModel

from .batching import Coalescer
from .errors import ServeError, from_data_error
from .results import result
from .shards import LoadedShard, LocalShardClient, ServeShardClient, ShardedSearch, load_shard, parse_shard_id, shard_info
from .sources import remember


def model_from_source(source: dict[str, Any], device: str | None = None) -> PatchModel:
    """The PatchModel of an artifact version from its verified bytes (``sources.model_source``):
    the same construction and weights check as ``tocoad_ray.pipeline.load_detector``."""
    from safetensors.torch import load as load_safetensors

    from tocoad_ray.models.reconpatch import PatchAdapter
    from tocoad_ray.models.weights import load_into

    cfg = from_dict(Config, source["config"])
    bb, files = source["backbone"], source["files"]
    if bb.get("fine_tuned"):
        if "backbone.safetensors" not in files:
            raise ArtifactError("artifact file missing: backbone.safetensors (the fine-tuned F)")
        with torch.random.fork_rng(devices=[]):  # the random init is overwritten below
            extractor = FeatureExtractor(bb["name"], bb["layers"], "random")
        load_into(extractor.body, load_safetensors(files["backbone.safetensors"]), "backbone.safetensors")
        extractor.refresh_checksum()
    else:
        extractor = FeatureExtractor(bb["name"], bb["layers"], cfg.backbone.weights)
    if extractor.weights_sha256 != bb["weights_sha256"]:
        raise ArtifactError(f"backbone weights sha256 {extractor.weights_sha256[:12]}… differ from the "
                            f"{bb['weights_sha256'][:12]}… the bank was built with")
    adapter = None
    if "adapter.safetensors" in files:
        adapter = PatchAdapter.from_state_dict(load_safetensors(files["adapter.safetensors"]))
    return PatchModel(extractor, cfg.bank.patch_size, adapter=adapter,
                      device=resolve_device(device or cfg.bank.device), fast=cfg.backbone.fast_inference)


MAX_LOCAL_BANKS = 16  # banks a replica searches itself (the least recently used ones go first)


@serve.deployment(name="Backbone")
class Backbone:
    """Upload bytes → the image's answer (score, decision, map); requests are batched."""

    def __init__(self, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01, torch_threads: int = 0,
                 shard=None):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.threads = torch_threads if torch_threads > 0 else cores
        torch.set_num_threads(self.threads)
        self.shard = shard
        self._batches = Coalescer(self._score_batch, max_batch_size, batch_wait_timeout_s)
        # uploads are decoded as they arrive, while the previous batch's forward pass runs: decoding
        # is single-threaded work that would otherwise leave cores idle at the start of every batch
        self._decoder = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="decode")
        # the last 1,000 of each (deques: no copy per request)
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=1000)
        self.in_replica: collections.deque[float] = collections.deque(maxlen=1000)  # s per request, queue included
        self.seconds: collections.deque[tuple] = collections.deque(maxlen=1000)  # per batch: images, F, the rest
        self._sources: dict = {}  # multiplex id -> ObjectRef of its model source
        self._prep: dict[str, Preprocess] = {}  # version sha -> its preprocessing
        self._banks: collections.OrderedDict[str, LoadedShard] = collections.OrderedDict()  # searched here

    @serve.multiplexed(max_num_models_per_replica=4)
    async def get_model(self, mid: str) -> PatchModel:
        # the version the registry verified and put in the object store (never re-read from disk)
        source = await self._sources[mid]
        return await asyncio.to_thread(model_from_source, source)

    def _remember(self, mid: str, source: list) -> None:
        remember(self._sources, mid, source[0])  # [ObjectRef]: the list keeps Ray from resolving it in transit

    async def warm(self, source: list) -> dict:
        """Load the model of this request's multiplex id (the registry calls it before publishing)."""
        mid = serve.get_multiplexed_model_id()
        self._remember(mid, source)
        model = await self.get_model(mid)
        return {"device": str(model.device)}

    async def _bank(self, sid: str, source: list) -> LoadedShard:
        """A bank searched in this replica, from the version the registry published (object store)."""
        shard = self._banks.get(sid)
        if shard is None:
            bank = await source[0]
            _, _, i, n = parse_shard_id(sid)
            shard = await asyncio.to_thread(load_shard, bank, dict(source[1]), i, n)
            self._banks[sid] = shard
            while len(self._banks) > MAX_LOCAL_BANKS:
                self._banks.popitem(last=False)
        self._banks.move_to_end(sid)
        return shard

    async def warm_bank(self, sid: str, source: list) -> dict[str, Any]:
        """Load a bank searched here (the registry calls it before publishing, as ``BankShard.info``)."""
        return shard_info(await self._bank(sid, source))

    def _preprocess(self, ctx: dict[str, Any]) -> Preprocess:
        p = self._prep.get(ctx["sha"])
        if p is None:
            p = Preprocess(from_dict(DataConfig, ctx["data"]), ctx["mean"], ctx["std"])
            self._prep = {**self._prep, ctx["sha"]: p} if len(self._prep) < 64 else {ctx["sha"]: p}
        return p

    def _decode(self, data: bytes, ctx: dict[str, Any], max_pixels: int) -> torch.Tensor:
        try:
            return self._preprocess(ctx).image(decode_image_bytes(data, max_pixels))
        except DataError as e:
            raise from_data_error(e, max_pixels) from e

    async def score(self, data: bytes, ctx: dict[str, Any], source: list, map_mode: str | None,
                    threshold: float | None, settings: dict[str, Any]) -> dict[str, Any]:
        """One upload → its answer, or ``{"error": code, "status": s, "detail": d}`` for an image
        the client must fix (so no exception crosses the deployment boundary for bad input)."""
        self._remember(serve.get_multiplexed_model_id(), source)
        t0 = time.perf_counter()
        out = await self._decode_and_submit(serve.get_multiplexed_model_id(), data, ctx, map_mode, threshold, settings)
        self.in_replica.append(time.perf_counter() - t0)
        return out

    async def _decode_and_submit(self, mid: str, data: bytes, ctx: dict[str, Any], map_mode: str | None,
                                 threshold: float | None, settings: dict[str, Any]) -> dict[str, Any]:
        """Decode on the decoder threads, then join the batch queue (uploads arriving together, from
        the batch route or from clients at the same moment, meet in one batch)."""
        try:
            x = await asyncio.get_running_loop().run_in_executor(self._decoder, self._decode, data, ctx,
                                                                 settings["max_pixels"])
        except ServeError as e:
            return {"error": e.code, "status": e.status, "detail": e.detail}
        return await self._batches.submit(mid, (x, ctx, map_mode, threshold, settings))

    async def score_many(self, uploads: list[bytes], ctx: dict[str, Any], source: list, map_mode: str | None,
                         threshold: float | None, settings: dict[str, Any]) -> list[dict[str, Any]]:
        """``score`` for several uploads of one request (the batch route): they enter the batch
        queue together, so they share forward passes (and other clients' images may join them)."""
        self._remember(serve.get_multiplexed_model_id(), source)
        mid = serve.get_multiplexed_model_id()
        return list(await asyncio.gather(*(self._decode_and_submit(mid, d, ctx, map_mode, threshold, settings)
                                           for d in uploads)))

    async def _score_batch(self, mid: str, items: list[tuple]) -> list[dict[str, Any]]:
        # one batch at a time (the Coalescer's single loop): a second one's forward pass would
        # only compete for the same cores
        model = await self.get_model(mid)
        self.batch_sizes.append(len(items))
        banks = {}  # the banks this batch searches here, loaded before the worker thread runs
        for _, ctx, *_ in items:
            sid = ctx["shards"][0]["id"]
            if ctx.get("search") == "backbone" and sid not in banks:
                banks[sid] = await self._bank(sid, ctx["bank_source"])
        return await asyncio.to_thread(self._answer, model, items, banks)

    def _answer(self, model: PatchModel, items: list[tuple], banks: dict[str, LoadedShard]) -> list[dict[str, Any]]:
        """One forward pass for the batch (decoded images), one search fan-out per product version in it."""
        torch.set_num_threads(self.threads)  # OpenMP's setting is per thread: this is an executor's
        if any(not b.index.on_gpu for b in banks.values()):  # faiss's OpenMP setting is per thread too
            import faiss

            faiss.omp_set_num_threads(self.threads)
        out: list[dict[str, Any] | None] = [None] * len(items)
        xs: dict[int, torch.Tensor] = {j: item[0] for j, item in enumerate(items)}
        good = sorted(xs)
        t0 = time.perf_counter()
        rows, (h, w) = model.embed(torch.stack([xs[j] for j in good]))
        t_embed = time.perf_counter() - t0
        P = h * w
        at = {j: n for n, j in enumerate(good)}  # item -> its rows in the forward pass
        groups: dict[tuple, list[int]] = {}  # products sharing an artifact may differ in shards
        for j in good:
            ctx = items[j][1]
            groups.setdefault((ctx["name"], ctx["sha"], tuple(s["id"] for s in ctx["shards"])), []).append(j)
        for idx in groups.values():
            ctx = items[idx[0]][1]
            clients = ([LocalShardClient(banks[ctx["shards"][0]["id"]])] if ctx.get("search") == "backbone" else
                       [ServeShardClient(self.shard, s["id"], ctx["bank_source"]) for s in ctx["shards"]])
            search = ShardedSearch(clients, [s["offset"] for s in ctx["shards"]], ctx["feature_dim"],
                                   approximate=ctx["index"] != "exact")
            q = np.concatenate([rows[at[j] * P:(at[j] + 1) * P] for j in idx])
            scores, s_prime = score_patches(search, q, len(idx), ctx["num_neighbors"])
            pre = self._preprocess(ctx)
            for n, j in enumerate(idx):
                x, (_, _, map_mode, threshold, settings) = xs[j], items[j]
                out[j] = result(ctx, float(scores[n]),
                                lambda n=n, x=x: anomaly_maps(s_prime[n * P:(n + 1) * P].reshape(1, h, w),
                                                              x.shape[-1], ctx["blur_sigma"])[0],
                                lambda x=x: pre.denormalize(x), map_mode, threshold, settings)
        self.seconds.append((len(good), t_embed, time.perf_counter() - t0 - t_embed))
        return out

    async def stats(self) -> dict:
        bs = self.batch_sizes
        n, fwd, rest = (np.sum(list(self.seconds), 0) if self.seconds else (0, 0.0, 0.0))
        return {"batches": len(bs), "mean_batch_size": float(np.mean(bs)) if bs else 0.0,
                "forward_ms_per_image": round(1000 * float(fwd) / n, 1) if n else None,
                "search_answer_ms_per_image": round(1000 * float(rest) / n, 1) if n else None,
                "ms_in_replica": round(1000 * float(np.mean(self.in_replica)), 1) if self.in_replica else None}
