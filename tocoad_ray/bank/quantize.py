"""Compact banks: 8-bit scalar quantisation (faiss ``QT_8bit``), 4× smaller than float32.

Each dimension gets its own range [vmin, vmin + vdiff] learned from the bank, and every value is
stored as one byte. The codes are searched as they are (faiss ``IndexScalarQuantizer`` /
``IndexIVFScalarQuantizer`` decode on the fly) and ``decode`` gives the same vectors the search
measured distances to, so eq. 9 sees the bank the search saw.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STORAGES = ("float32", "sq8")


@dataclass
class SQ8:
    """Trained 8-bit scalar quantiser for d dimensions (faiss layout: vmin[d] then vdiff[d])."""

    trained: np.ndarray  # float32 [2d]

    @property
    def dim(self) -> int:
        return len(self.trained) // 2

    @classmethod
    def train(cls, x: np.ndarray) -> "SQ8":
        import faiss

        sq = faiss.ScalarQuantizer(x.shape[1], faiss.ScalarQuantizer.QT_8bit)
        sq.train(np.ascontiguousarray(x, dtype=np.float32))
        return cls(faiss.vector_to_array(sq.trained).astype(np.float32))

    def _faiss(self):
        import faiss

        sq = faiss.ScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_8bit)
        faiss.copy_array_to_vector(np.ascontiguousarray(self.trained, dtype=np.float32), sq.trained)
        return sq

    def encode(self, x: np.ndarray) -> np.ndarray:
        return self._faiss().compute_codes(np.ascontiguousarray(x, dtype=np.float32))

    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes, dtype=np.uint8)
        flat = codes.reshape(-1, self.dim)
        return self._faiss().decode(np.ascontiguousarray(flat)).reshape(codes.shape[:-1] + (self.dim,))

    def install(self, index) -> None:
        """Give a faiss SQ index (flat or IVF) these trained ranges."""
        import faiss

        faiss.copy_array_to_vector(np.ascontiguousarray(self.trained, dtype=np.float32), index.sq.trained)
        index.is_trained = True if not hasattr(index, "quantizer") else index.is_trained
