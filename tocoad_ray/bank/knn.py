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


SEARCH_KINDS = ("exact", "ivf")


class KNNIndex:
    """L2 index over ``bank`` [M, d]; ``search`` returns Euclidean (not squared) distances.

    ``kind="exact"``: faiss ``IndexFlatL2``. ``kind="ivf"``: an inverted file (``IndexIVFFlat``,
    ``nlist`` k-means cells, ``nprobe`` visited per query) for the bulk of the queries. Its
    distances are exact distances to the candidates it visits, so each is an *upper bound* of the
    true nearest distance (never below it); ``exact_search`` scans the whole bank for the few
    queries whose exact answer decides a result (``scoring.refine_maxima``)."""

    def __init__(self, bank: np.ndarray, use_gpu: bool = False, gpu_temp_memory: int | None = 512 << 20,
                 kind: str = "exact", nlist: int = 0, nprobe: int = 32, sq8=None):
        import faiss

        # sq8 (bank.quantize.SQ8): ``bank`` holds uint8 codes, searched without decoding the bank
        self.sq8 = sq8
        self.bank = np.ascontiguousarray(bank, dtype=np.uint8 if sq8 is not None else np.float32)
        if self.bank.ndim != 2 or self.bank.shape[0] == 0:
            raise ValueError(f"memory bank must be a non-empty [M, d] array, got shape {self.bank.shape}")
        if kind not in SEARCH_KINDS:
            raise ValueError(f"search kind must be one of {SEARCH_KINDS}, got {kind!r}")
        self.dim = self.bank.shape[1]
        n = len(self.bank)
        # faiss wants >= 39 training points per cell; a bank too small for 2 cells stays exact
        nlist = min(nlist or int(4 * np.sqrt(n)), n // 39)
        self.kind = "ivf" if kind == "ivf" and nlist >= 2 else "exact"
        self.approximate = self.kind == "ivf"
        vectors = self.bank if sq8 is None else sq8.decode(self.bank)  # what the index stores (re-encoded)
        if self.approximate:
            quantizer = faiss.IndexFlatL2(self.dim)
            if sq8 is None:
                index = faiss.IndexIVFFlat(quantizer, self.dim, nlist)
            else:
                index = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                                      faiss.METRIC_L2, False)
            index.cp.seed = 1234  # k-means seed: the same bank gives the same cells
            index.train(vectors)
            if sq8 is not None:
                sq8.install(index)
            index.nprobe = max(1, min(nprobe, nlist))
            self._quantizer = quantizer  # the IVF index does not own it
        elif sq8 is None:
            index = faiss.IndexFlatL2(self.dim)
        else:
            index = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_L2)
            sq8.install(index)
        if sq8 is not None:
            use_gpu = False  # the 8-bit indexes run on CPU here
        self.on_gpu = bool(use_gpu and faiss_gpu_available())
        if self.on_gpu:
            # each StandardGpuResources reserves scratch memory; cap it so replicas can share a GPU
            self._res = faiss.StandardGpuResources()
            if gpu_temp_memory is not None:
                self._res.setTempMemory(gpu_temp_memory)
            index = faiss.index_cpu_to_gpu(self._res, 0, index)
        index.add(vectors)
        del vectors
        self.index = index
        self._flat = index if not self.approximate else None
        if self._flat is None and sq8 is not None:  # exact scans of an 8-bit bank use its codes too
            self._flat = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_L2)
            sq8.install(self._flat)
            self._flat.add(sq8.decode(self.bank))

    def vectors(self, idx: np.ndarray) -> np.ndarray:
        """Bank vectors (decoded when 8-bit: the vectors the search measured)."""
        rows = self.bank[idx]
        return rows if self.sq8 is None else self.sq8.decode(rows)

    @property
    def nbytes(self) -> int:
        """Bytes held for the bank: the array plus every faiss index's codes (and IVF list ids)."""
        total = self.bank.nbytes
        for idx in {id(self.index): self.index, id(self._flat): self._flat}.values():
            if idx is None or self.on_gpu:
                continue
            total += idx.ntotal * (idx.sa_code_size() + (8 if hasattr(idx, "nprobe") else 0))
        return int(total)

    def __len__(self) -> int:
        return self.bank.shape[0]

    def _check(self, queries: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [N, {self.dim}], got {q.shape}")
        return q

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        q = self._check(queries)
        k = min(k, len(self))
        d2, idx = self.index.search(q, k)
        if self.approximate and (idx < 0).any():  # fewer than k candidates in the visited cells
            return self.exact_search(q, k)
        return np.sqrt(np.maximum(d2, 0.0)), idx

    def exact_search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Exact k-NN over the whole bank, whatever the index kind."""
        import faiss

        q = self._check(queries)
        k = min(k, len(self))
        if self._flat is None:
            if not self.on_gpu:  # brute force on the bank array: no second copy of the vectors
                d2, idx = faiss.knn(q, self.bank, k)
                return np.sqrt(np.maximum(d2, 0.0)), idx
            flat = faiss.IndexFlatL2(self.dim)
            flat.add(self.bank)
            self._flat = faiss.index_cpu_to_gpu(self._res, 0, flat)
        d2, idx = self._flat.search(q, k)
        return np.sqrt(np.maximum(d2, 0.0)), idx
