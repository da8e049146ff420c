"""Anomaly scores from the memory bank M: eq. 8 (patch), eq. 9 (image), and the pixel map.

Scoring is written against a small search interface so that a bank split into shards (the Serve
layer) computes exactly the same numbers as a single in-process index.
"""
from __future__ import annotations

import functools
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as Fn


class NeighbourSearch(Protocol):
    """``search`` may be approximate (``approximate = True``): its distances are then upper bounds
    of the true nearest distances, and ``exact_search`` gives the exact answer for a few queries."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Euclidean distances and global bank indices of the k nearest bank items, ascending."""

    def vectors(self, idx: np.ndarray) -> np.ndarray:
        """Bank vectors for global indices ``idx`` (any shape) → idx.shape + (d,)."""


def exact(search: NeighbourSearch):
    """The search's exact k-NN (``exact_search`` of an approximate index, else ``search``)."""
    return search.exact_search if getattr(search, "approximate", False) else search.search


def patch_scores(search: NeighbourSearch, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 8: s'_t = min_{c∈M} ‖p_t − c‖ for every patch; also returns the index of c*."""
    d, i = search.search(patches, 1)
    return d[:, 0], i[:, 0]


BOUND_RTOL = 1e-3  # faiss IVF and flat distances of the same pair agree to ~1e-4 relative


def refine_maxima(search: NeighbourSearch, patches: np.ndarray, s_prime: np.ndarray, nn_idx: np.ndarray,
                  n_images: int, step: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Make each image's most anomalous patch exact after an approximate eq. 8.

    An approximate s' is never below the exact one (up to rounding, ``BOUND_RTOL``). Per image, patches are made exact in descending
    order of their approximate s' until the next approximate value is below the largest exact one:
    no remaining patch can then be the maximum. The argmax, its s' and its c* (all eq. 9 needs)
    equal the exact search's; the other patches keep their approximate s' (the pixel map)."""
    s, nn = s_prime.copy(), nn_idx.copy()
    P = len(s) // n_images
    order = np.argsort(-s.reshape(n_images, P), axis=1, kind="stable")
    best = np.full(n_images, -np.inf)
    pos = np.zeros(n_images, dtype=np.int64)
    todo = np.arange(n_images)
    while len(todo):
        cols = np.minimum(pos[todo, None] + np.arange(step)[None], P - 1)
        cand = order[todo[:, None], cols]
        rows = np.unique((todo[:, None] * P + cand).reshape(-1))
        d, i = exact(search)(patches[rows], 1)
        s[rows], nn[rows] = d[:, 0], i[:, 0]
        img = rows // P
        np.maximum.at(best, img, d[:, 0])
        pos[todo] += step
        nxt = np.where(pos[todo] < P, s_prime[todo * P + order[todo, np.minimum(pos[todo], P - 1)]], -np.inf)
        # the next candidate could still be the maximum (margin: the two searches round differently)
        todo = todo[nxt >= best[todo] * (1.0 - BOUND_RTOL)]
    return s, nn


def score_patches(search: NeighbourSearch, patches: np.ndarray, n_images: int, b: int = 9
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 8 for every patch and eq. 9 per image: (image scores [n_images], s' [n_images·P]).
    With an approximate search the image scores still equal the exact ones (``refine_maxima``)."""
    s, nn = patch_scores(search, patches)
    if getattr(search, "approximate", False):
        s, nn = refine_maxima(search, patches, s, nn, n_images)
    return reweighted_image_scores(search, patches, s, nn, n_images, b), s


def reweighted_image_scores(
    search: NeighbourSearch,
    patches: np.ndarray,
    s_prime: np.ndarray,
    nn_idx: np.ndarray,
    n_images: int,
    b: int = 9,
) -> np.ndarray:
    """Eq. 9 on each image's most anomalous patch.

    For the patch p with the largest s' (its nearest bank item c*), with N_b(c*) the b nearest bank
    items of c* (c* itself included): s = (1 − exp(s') / Σ_{c'∈N_b(c*)} exp(‖p − c'‖)) · s'.
    ``patches``/``s_prime``/``nn_idx`` hold n_images·P rows, image-major.
    """
    P = s_prime.shape[0] // n_images
    s = s_prime.reshape(n_images, P)
    arg = s.argmax(1)
    rows = np.arange(n_images) * P + arg
    s_max = s_prime[rows].astype(np.float64)
    p_max = patches[rows]
    c_star = search.vectors(nn_idx[rows])
    _, nb = exact(search)(c_star, b)  # [B, b]
    dist = np.linalg.norm(search.vectors(nb).astype(np.float64) - p_max[:, None, :].astype(np.float64), axis=-1)
    # exp(s')/Σ exp(E) computed stably as exp(s' − max)/Σ exp(E − max)
    m = np.maximum(dist.max(1), s_max)
    w = 1.0 - np.exp(s_max - m) / np.exp(dist - m[:, None]).sum(1)
    return (w * s_max).astype(np.float64)


def gaussian_kernel_size(sigma: float) -> int:
    return 2 * int(4.0 * sigma + 0.5) + 1


def anomaly_maps(s_prime_grid: np.ndarray | torch.Tensor, size: int | tuple[int, int], sigma: float = 4.0) -> np.ndarray:
    """Patch scores [B, h, w] → pixel maps [B, H, W]: bilinear upsampling then Gaussian blur (σ = 4)."""
    t = torch.as_tensor(np.asarray(s_prime_grid, dtype=np.float32))[:, None]
    size = (size, size) if isinstance(size, int) else tuple(size)
    t = Fn.interpolate(t, size=size, mode="bilinear", align_corners=False)
    if sigma > 0:
        t = gaussian_blur_separable(t, sigma)
    return t[:, 0].numpy()


def gaussian_blur_separable(t: torch.Tensor, sigma: float) -> torch.Tensor:
    """torchvision's ``gaussian_blur`` (same kernel, reflect padding) as two matrix products, one
    per axis: the 1-D blur with its reflected borders is a fixed [n, n] matrix, so a [B, 1, H, W]
    map costs two BLAS calls instead of a k × k convolution (33 × 33 at σ = 4)."""
    h, w = t.shape[-2:]
    mh, mw = _blur_matrix(h, float(sigma)).to(t.dtype), _blur_matrix(w, float(sigma)).to(t.dtype)
    return torch.matmul(mh.T, torch.matmul(t, mw))


@functools.lru_cache(maxsize=16)
def _blur_matrix(n: int, sigma: float) -> torch.Tensor:
    """M with (x @ M)[i] = Σ_o g[o]·x[reflect(i + o)]: torchvision's kernel and reflect padding."""
    k = gaussian_kernel_size(sigma)
    r = k // 2
    if r >= n:
        raise ValueError(f"blur sigma {sigma} needs maps larger than {r} pixels, got {n}")
    x = torch.linspace(-(k - 1) * 0.5, (k - 1) * 0.5, steps=k, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / sigma).pow(2))
    g = g / g.sum()
    m = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for o in range(-r, r + 1):
            src = abs(i + o)
            if src >= n:
                src = 2 * n - 2 - src
            m[src, i] += g[o + r]
    return m.float()
