"""The memory bank M itself: coreset of normal patch features + exact k-NN index (ToCoAD §3.3)."""
from __future__ import annotations

import numpy as np
import torch

from .bank_format import bank_arrays
from .coreset import greedy_coreset
from .knn import KNNIndex
from .scoring import reweighted_image_scores, score_patches


class MemoryBank:
    """M: bank vectors [M, d] plus, per row, the training image it came from (for leave-one-out stats)."""

    def __init__(self, bank: np.ndarray, source_image: np.ndarray | None = None, use_gpu: bool = False,
                 search: str = "exact", nlist: int = 0, nprobe: int = 32, sq8=None):
        # sq8 (quantize.SQ8): ``bank`` holds its uint8 codes (a compact bank, 4x smaller)
        self.sq8 = sq8
        self.bank = np.ascontiguousarray(bank, dtype=np.float32 if sq8 is None else np.uint8)
        self.source_image = (
            np.asarray(source_image, dtype=np.int32) if source_image is not None else np.full(len(self.bank), -1, np.int32)
        )
        if self.source_image.shape != (len(self.bank),):
            raise ValueError("source_image must have one entry per bank row")
        self.index = KNNIndex(self.bank, use_gpu=use_gpu, kind=search, nlist=nlist, nprobe=nprobe, sq8=sq8)
        self.approximate = self.index.approximate

    @classmethod
    def build(cls, patches: np.ndarray, ratio: float = 0.1, projection_dim: int | None = 128, seed: int = 0,
              source_image: np.ndarray | None = None, use_gpu: bool = False, progress: bool = False,
              eps: float = 0.0, device: str | torch.device = "cpu") -> "MemoryBank":
        """Eq. 7: greedy coreset of ``ratio`` of the patches (ratio 1 keeps them all); ``eps``/``device``
        as in :func:`greedy_coreset`."""
        if len(patches) == 0:
            raise ValueError("no training patches: the training set is empty")
        n_select = max(1, int(round(len(patches) * ratio)))
        if n_select >= len(patches):
            sel = np.arange(len(patches))
        else:
            sel = np.sort(greedy_coreset(patches, n_select, projection_dim, seed, progress=progress, eps=eps,
                                         device=device))
        src = None if source_image is None else np.asarray(source_image)[sel]
        return cls(patches[sel], src, use_gpu=use_gpu)

    # NeighbourSearch protocol
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k)

    def exact_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.exact_search(queries, k)

    def vectors(self, idx: np.ndarray) -> np.ndarray:
        return self.index.vectors(idx)

    def quantized(self) -> "MemoryBank":
        """This bank stored as 8-bit codes (``quantize.SQ8``), same rows and sources."""
        from .quantize import SQ8

        sq = SQ8.train(self.bank)
        return MemoryBank(sq.encode(self.bank), self.source_image, search=self.index.kind, sq8=sq)

    @property
    def dim(self) -> int:
        return self.bank.shape[1]

    def __len__(self) -> int:
        return len(self.bank)

    def score(self, patches: np.ndarray, n_images: int, b: int = 9) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (eq. 9) [n_images] and patch scores s' (eq. 8) [n_images·P]."""
        return score_patches(self, patches, n_images, b)

    def leave_one_out_scores(self, patches: np.ndarray, image_ids: np.ndarray, n_images: int, b: int = 9,
                             k: int = 32) -> np.ndarray:
        """Image scores of *training* images against the bank without their own rows.

        A training image's own patches sit in the bank, so its plain score is optimistic; excluding
        bank rows that came from the same image gives held-out-like normal scores for thresholds.
        """
        d, i = self.index.exact_search(patches, k)
        own = self.source_image[i] == np.repeat(image_ids, len(patches) // len(image_ids))[:, None]
        d = np.where(own, np.inf, d)
        j = d.argmin(1)
        s = d[np.arange(len(d)), j]
        nn = i[np.arange(len(d)), j]
        # all k neighbours from the same image (rare): fall back to the k-th distance, a lower bound
        bad = ~np.isfinite(s)
        s[bad] = self.index.exact_search(patches[bad], k)[0][:, -1] if bad.any() else s[bad]
        nn[bad] = i[bad, -1]
        return reweighted_image_scores(self, patches, s.astype(np.float32), nn, n_images, b)


def bank_tensors(bank: MemoryBank) -> dict[str, np.ndarray]:
    """What ``bank.safetensors`` holds: float32 ``bank``, or 8-bit ``bank_codes`` + ``sq8_trained``."""
    out = {"source_image": bank.source_image}
    if bank.sq8 is None:
        out["bank"] = bank.bank
    else:
        out["bank_codes"], out["sq8_trained"] = bank.bank, bank.sq8.trained
    return out


def bank_from_tensors(tensors: dict[str, np.ndarray], fmt: str, dim: int, where: str, **index) -> MemoryBank:
    """The inverse of ``bank_tensors`` (checks: ``bank_format.bank_arrays``)."""
    arr, source_image, sq = bank_arrays(tensors, fmt, dim, where)
    return MemoryBank(arr, source_image, sq8=sq, **index)

