"""The memory bank split into shards, one Serve multiplexed "model" per (artifact version, shard).

``BankShard`` replicas each hold whichever shards were routed to them (multiplexing keeps a shard
on the replica that already loaded it; autoscaling adds replicas under load). ``ShardedSearch``
fans a query out to all shards of a product and merges their top-k, implementing the library's
``NeighbourSearch`` protocol so ``tocoad_ray.bank.scoring`` runs on it unchanged.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
from ray import serve

from tocoad_ray.artifact import ArtifactError, load_tensors, read_meta
from tocoad_ray.bank.knn import KNNIndex, faiss_gpu_available
from tocoad_ray.bank.bank_format import bank_arrays
from tocoad_ray.bank.quantize import SQ8

from .sources import remember


def shard_bounds(n: int, shards: int) -> list[int]:
    """Row boundaries of ``shards`` contiguous, near-equal slices of an n-row bank."""
    shards = max(1, min(int(shards), n))
    return [int(round(n * i / shards)) for i in range(shards + 1)]


def meta_sha(artifact: str | Path) -> str:
    """The version of an artifact: sha256 of meta.json (which holds every other file's sha256)."""
    return hashlib.sha256((Path(artifact) / "meta.json").read_bytes()).hexdigest()


def shard_id(artifact: str, sha: str, i: int, n: int) -> str:
    return f"{artifact}|{sha}|{i}|{n}"


def parse_shard_id(mid: str) -> tuple[str, str, int, int]:
    artifact, sha, i, n = mid.rsplit("|", 3)
    return artifact, sha, int(i), int(n)


@dataclass
class LoadedShard:
    index: KNNIndex
    offset: int

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(q, k)

    def exact_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.exact_search(q, k)

    def vectors(self, local_idx: np.ndarray) -> np.ndarray:
        return self.index.vectors(local_idx)


def read_bank(artifact: str, sha: str) -> tuple[np.ndarray, dict[str, Any]]:
    """The verified bank of an artifact version and its index settings (faiss GPU, search kind);
    refuses an artifact that changed since ``sha``."""
    meta = read_meta(artifact, verify=True)
    if meta_sha(artifact) != sha:
        raise ArtifactError(f"{artifact} changed on disk since version {sha[:12]} was published")
    b = meta["config"]["bank"]
    index = {"faiss_gpu": bool(b.get("faiss_gpu", True)), "kind": b.get("search", "exact"),
             "nlist": int(b.get("ivf_nlist", 0)), "nprobe": int(b.get("ivf_nprobe", 32))}
    try:  # the same format checks as load_detector
        bank, _, sq8 = bank_arrays(load_tensors(Path(artifact) / "bank.safetensors"), meta.get("bank_format", "float32"),
                                   int(meta["feature_dim"]), f"{artifact}/bank.safetensors")
    except ValueError as e:
        raise ArtifactError(str(e)) from e
    if sq8 is not None:
        index["sq8_trained"] = sq8.trained
    return np.ascontiguousarray(bank), index


def load_shard(bank: np.ndarray, index: dict[str, Any], i: int, n: int) -> LoadedShard:
    """Shard i of n of a bank (rows ``shard_bounds``), indexed as the artifact asks (``read_bank``)."""
    b = shard_bounds(len(bank), n)
    if i >= len(b) - 1:
        raise ArtifactError(f"shard {i} of {n} does not exist for a bank of {len(bank)} rows")
    sq8 = SQ8(np.asarray(index["sq8_trained"], dtype=np.float32)) if "sq8_trained" in index else None
    knn = KNNIndex(np.array(bank[b[i]:b[i + 1]]), use_gpu=index["faiss_gpu"] and faiss_gpu_available(),
                   kind=index["kind"], nlist=index["nlist"], nprobe=index["nprobe"], sq8=sq8)
    return LoadedShard(knn, b[i])


@serve.deployment(name="BankShard")
class BankShard:
    """Holds bank shards (faiss GPU index when a GPU is present, CPU otherwise) and answers k-NN.

    Shards load from the object store (the bank version the registry verified and published, sent
    along with each request as ``source``), never from disk: a replica that restarts serves the
    version it served before, whatever happened to the product's folder since."""

    def __init__(self, faiss_threads: int = 0):
        # 0: every core of the node (Ray's OMP_NUM_THREADS for a 0.5-CPU replica would be 1)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.threads = faiss_threads if faiss_threads > 0 else cores
        self._cpu_search = not faiss_gpu_available()
        self._sources: dict = {}  # multiplex id -> (ObjectRef of the bank, index settings)

    @serve.multiplexed(max_num_models_per_replica=64)
    async def get_shard(self, mid: str) -> LoadedShard:
        ref, index = self._sources[mid]
        bank = await ref
        _, _, i, n = parse_shard_id(mid)
        return await asyncio.to_thread(load_shard, bank, index, i, n)

    async def _shard(self, source: list) -> LoadedShard:
        mid = serve.get_multiplexed_model_id()
        remember(self._sources, mid, (source[0], dict(source[1])), limit=256)  # [ObjectRef, index settings]
        return await self.get_shard(mid)

    def _threaded(self, fn, *args):
        """Run a search on this (worker) thread with the replica's OpenMP threads: the setting is
        per calling thread, so one made in ``__init__`` would not reach the executor's threads."""
        if self._cpu_search:
            import faiss

            faiss.omp_set_num_threads(self.threads)
        return fn(*args)

    async def search(self, q: np.ndarray, k: int, source: list) -> tuple[np.ndarray, np.ndarray]:
        shard = await self._shard(source)
        return await asyncio.to_thread(self._threaded, shard.search, q, k)

    async def exact_search(self, q: np.ndarray, k: int, source: list) -> tuple[np.ndarray, np.ndarray]:
        shard = await self._shard(source)
        return await asyncio.to_thread(self._threaded, shard.exact_search, q, k)

    async def vectors(self, local_idx: np.ndarray, source: list) -> np.ndarray:
        shard = await self._shard(source)
        return shard.vectors(local_idx)

    async def info(self, source: list) -> dict[str, Any]:
        return shard_info(await self._shard(source))


class Result(Protocol):
    def result(self) -> Any: ...


class ShardClient(Protocol):
    """One shard: calls return something with ``.result()`` so fan-outs can overlap."""

    def search(self, q: np.ndarray, k: int) -> Result: ...

    def vectors(self, local_idx: np.ndarray) -> Result: ...


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class LocalShardClient:
    """A shard held by the calling process (the Backbone replica, for a small bank): the same calls
    answered in place, so ``ShardedSearch`` and eq. 8/9 run unchanged without a hop."""

    def __init__(self, shard: LoadedShard):
        self.shard = shard

    def search(self, q, k):
        return _Done(self.shard.search(q, k))

    def exact_search(self, q, k):
        return _Done(self.shard.exact_search(q, k))

    def vectors(self, local_idx):
        return _Done(self.shard.vectors(local_idx))


def shard_info(shard: LoadedShard) -> dict[str, Any]:
    return {"offset": shard.offset, "size": len(shard.index), "on_gpu": shard.index.on_gpu,
            "index": shard.index.kind, "bytes": shard.index.nbytes}


class ServeShardClient:
    """A shard behind the ``BankShard`` deployment, addressed by its multiplex id; ``source`` is
    [bank ObjectRef, faiss_gpu] of the published version."""

    def __init__(self, handle, mid: str, source: list):
        self.h = handle.options(multiplexed_model_id=mid)
        self.source = source

    def search(self, q, k):
        return self.h.search.remote(q, k, self.source)

    def exact_search(self, q, k):
        return self.h.exact_search.remote(q, k, self.source)

    def vectors(self, local_idx):
        return self.h.vectors.remote(local_idx, self.source)


class ShardedSearch:
    """NeighbourSearch over shards: fan out, shift local indices by the shard offset, merge top-k."""

    def __init__(self, clients: Sequence[ShardClient], offsets: Sequence[int], dim: int, approximate: bool = False):
        if len(clients) != len(offsets) or not clients:
            raise ValueError("need one offset per shard and at least one shard")
        self.clients = list(clients)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.dim = dim
        self.approximate = approximate  # shards hold IVF indexes: merged distances are upper bounds

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._merged(queries, k, "search")

    def exact_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._merged(queries, k, "exact_search")

    def _merged(self, queries: np.ndarray, k: int, method: str) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        pending = [getattr(c, method)(q, k) for c in self.clients]  # all in flight before waiting on any
        ds, ids = [], []
        for off, p in zip(self.offsets, pending):
            d, i = p.result()
            ds.append(d)
            ids.append(i.astype(np.int64) + off)
        d, i = np.concatenate(ds, 1), np.concatenate(ids, 1)
        # stable sort: equal distances keep the lower global index first, like one flat index
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)

    def vectors(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        flat = idx.reshape(-1)
        owner = np.searchsorted(self.offsets, flat, side="right") - 1
        out = np.empty((len(flat), self.dim), dtype=np.float32)
        pending = [(s, self.clients[s].vectors(flat[owner == s] - self.offsets[s])) for s in np.unique(owner)]
        for s, p in pending:
            out[owner == s] = p.result()
        return out.reshape(idx.shape + (self.dim,))
