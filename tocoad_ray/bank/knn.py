"""Exact nearest-neighbour search over the memory bank with faiss (CPU here, GPU when available)."""
from __future__ import annotations

import numpy as np


def faiss_gpu_available() -> bool:
    """True when the installed faiss has GPU support and sees a GPU (faiss-gpu-cu12 on a GPU node)."""
    try:
        import faiss

        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:
        return False


class KNNIndex:
    """Exact L2 index over ``bank`` [M, d]. ``search`` returns Euclidean (not squared) distances."""

    def __init__(self, bank: np.ndarray, use_gpu: bool = False, gpu_temp_memory: int | None = 512 << 20):
        import faiss

        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        if self.bank.ndim != 2 or self.bank.shape[0] == 0:
            raise ValueError(f"memory bank must be a non-empty [M, d] array, got shape {self.bank.shape}")
        self.dim = self.bank.shape[1]
        index = faiss.IndexFlatL2(self.dim)
        self.on_gpu = bool(use_gpu and faiss_gpu_available())
        if self.on_gpu:
            # each StandardGpuResources reserves scratch memory; cap it so replicas can share a GPU
            self._res = faiss.StandardGpuResources()
            if gpu_temp_memory is not None:
                self._res.setTempMemory(gpu_temp_memory)
            index = faiss.index_cpu_to_gpu(self._res, 0, index)
        index.add(self.bank)
        self.index = index

    def __len__(self) -> int:
        return self.bank.shape[0]

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [N, {self.dim}], got {q.shape}")
        k = min(k, len(self))
        d2, idx = self.index.search(q, k)
        return np.sqrt(np.maximum(d2, 0.0)), idx
