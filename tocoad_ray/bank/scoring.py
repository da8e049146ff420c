"""Anomaly scores from the memory bank M: eq. 8 (patch), eq. 9 (image), and the pixel map.

Scoring is written against a small search interface so that a bank split into shards (the Serve
layer) computes exactly the same numbers as a single in-process index.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as Fn


class NeighbourSearch(Protocol):
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Euclidean distances and global bank indices of the k nearest bank items, ascending."""

    def vectors(self, idx: np.ndarray) -> np.ndarray:
        """Bank vectors for global indices ``idx`` (any shape) → idx.shape + (d,)."""


def patch_scores(search: NeighbourSearch, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 8: s'_t = min_{c∈M} ‖p_t − c‖ for every patch; also returns the index of c*."""
    d, i = search.search(patches, 1)
    return d[:, 0], i[:, 0]


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
    _, nb = search.search(c_star, b)  # [B, b]
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
        from torchvision.transforms.functional import gaussian_blur

        k = gaussian_kernel_size(sigma)
        t = gaussian_blur(t, kernel_size=[k, k], sigma=[sigma, sigma])
    return t[:, 0].numpy()
