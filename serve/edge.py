"""Products served from an exported model (``tocoad export``; product ``runtime: onnx`` or
``openvino``): the whole graph (F, the bank, eq. 9 and the map) runs in one replica, on the same
file and runtime a line-side PC scores with, so a product validated on the edge is served by
that graph. Each model version is one multiplexed model, its files taken from the object store;
requests are batched per version.
"""
from __future__ import annotations

import asyncio
import hashlib
import tempfile
from pathlib import Path

import numpy as np
from ray import serve

from .batching import Coalescer
from .sources import remember

EDGE_RUNTIMES = {"onnx": "onnxruntime", "openvino": "openvino"}


def model_files(path: str | Path) -> dict[str, bytes]:
    """The exported model's files by name: ``.onnx``, or OpenVINO's ``.xml`` and ``.bin``."""
    path = Path(path)
    files = {path.name: path.read_bytes()}
    if path.suffix.lower() == ".xml":
        files[path.with_suffix(".bin").name] = path.with_suffix(".bin").read_bytes()
    return files


def files_sha(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode())
        h.update(hashlib.sha256(files[name]).digest())
    return h.hexdigest()


def edge_model_id(path: str, sha: str) -> str:
    return f"{path}|{sha}"


def load_edge_model(files: dict[str, bytes], main: str, runtime: str, threads: int):
    """An ``EdgeModel`` from the files' bytes (checked, with their metadata, as on the edge)."""
    from tocoad_ray.export.runtime import EdgeModel

    with tempfile.TemporaryDirectory(prefix="tocoad-edge-") as d:
        for name, data in files.items():
            (Path(d) / name).write_bytes(data)
        # both runtimes hold the weights in memory once the model is compiled
        return EdgeModel(Path(d) / main, runtime=EDGE_RUNTIMES[runtime], threads=threads or None)


@serve.deployment(name="EdgeScorer")
class EdgeScorer:
    """Preprocessed [3, S, S] image → (image score, anomaly map [S, S]) through an exported model."""

    def __init__(self, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01, threads: int = 0):
        self._batches = Coalescer(self._score_batch, max_batch_size, batch_wait_timeout_s)
        self.threads = threads
        self._sources: dict = {}  # multiplex id -> [ObjectRef of the files, main file name, runtime]
        self.batch_sizes: list[int] = []

    @serve.multiplexed(max_num_models_per_replica=4)
    async def get_model(self, mid: str):
        ref, main, runtime = self._sources[mid]
        files = await ref
        return await asyncio.to_thread(load_edge_model, files, main, runtime, self.threads)

    def _remember(self, mid: str, source: list) -> None:
        remember(self._sources, mid, source)

    async def warm(self, source: list) -> dict:
        """Load the model of this request's multiplex id (the registry calls it before publishing)."""
        mid = serve.get_multiplexed_model_id()
        self._remember(mid, source)
        model = await self.get_model(mid)
        return {"runtime": model.runtime, "input_size": model.size, "meta": model.meta}

    async def score(self, image: np.ndarray, source: list) -> tuple[float, np.ndarray]:
        mid = serve.get_multiplexed_model_id()
        self._remember(mid, source)
        return await self._batches.submit(mid, image)

    async def _score_batch(self, mid: str, images: list[np.ndarray]) -> list[tuple[float, np.ndarray]]:
        model = await self.get_model(mid)  # one id per batch (the Coalescer's)
        self.batch_sizes = (self.batch_sizes + [len(images)])[-1000:]
        scores, maps = await asyncio.to_thread(model.score, np.stack(images))
        return [(float(s), m) for s, m in zip(scores, maps)]
