"""ReConPatch (Hyun et al. 2023): contrastive patch representation learning on frozen patch features.

Patch features φ (PatchCore's locally aggregated features, ``tocoad_ray.bank.embedding``) pass a
trainable linear modulation g (``ReConPatch.representation``, d→d', identity init) and a projection
h (``ReConPatch.projection``, 2-layer MLP d'→proj_dim). An EMA copy (ḡ, h̄) gives the targets
z̄ = h̄(ḡ(φ)) from which pseudo-labels are built (``pseudo_labels``):

* ``pairwise_similarity``: w_p(i,j) = exp(−‖z̄_i − z̄_j‖² / σ)
* ``contextual_similarity``: k-reciprocal neighbourhood overlap with query expansion, symmetrised
* w = α·w_p + (1−α)·w_c (symmetric, in [0, 1], diagonal set to 1)

The online branch z = h(g(φ)) is trained with ``relaxed_contrastive_loss``. At inference only g is
kept: ``PatchAdapter`` (the memory bank is built from g(φ)).

Conventions (documented here because the paper leaves them open):
* every k-NN set contains the point itself (distance 0, so |R_i| ≥ 1 and nothing divides by zero);
* the diagonal of every similarity matrix is 1 (a patch is fully similar to itself); the loss
  ignores the diagonal anyway;
* the loss averages over all ordered off-diagonal pairs (the paper sums over j and averages over i,
  i.e. the same up to a constant factor N−1).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as Fn
from torch import nn

_EPS = 1e-12


def _identity_linear(in_dim: int, out_dim: int) -> nn.Linear:
    """nn.Linear with weight = (rectangular) identity and zero bias: g(x) = x when d' = d."""
    lin = nn.Linear(in_dim, out_dim)
    with torch.no_grad():
        nn.init.eye_(lin.weight)
        lin.bias.zero_()
    return lin


def squared_distances(z: torch.Tensor) -> torch.Tensor:
    """[N, D] → [N, N] squared Euclidean distances (Gram form, clamped ≥ 0, exact-zero diagonal)."""
    sq = (z * z).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)).clamp_min(0.0)
    return d2 * (1.0 - torch.eye(z.shape[0], device=z.device, dtype=z.dtype))


def pairwise_similarity(z: torch.Tensor, sigma: float) -> torch.Tensor:
    """w_p(i,j) = exp(−‖z_i − z_j‖² / σ), [N, N], symmetric, diagonal 1."""
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    w = torch.exp(-squared_distances(z) / sigma)
    return (w + w.T) / 2  # exact symmetry despite rounding in the Gram form


def contextual_similarity(z: torch.Tensor, k: int, reciprocal: bool = True, query_expansion: bool = True) -> torch.Tensor:
    """Contextual similarity w_c [N, N] from k-NN sets (ReConPatch eq. 3-6, after STML).

    N_k(i): the k nearest points of i, i itself included. R_i = {j ∈ N_k(i) : i ∈ N_k(j)} (k-reciprocal;
    ``reciprocal=False``: R_i = N_k(i)). w̃(i,j) = |R_i ∩ R_j| / |R_i| if j ∈ R_i else 0. Query expansion:
    ŵ(i,j) = mean over l ∈ N_{⌈k/2⌉}(i) of w̃(l,j) (``query_expansion=False``: ŵ = w̃).
    w_c = (ŵ + ŵᵀ) / 2, then the diagonal is set to 1. Values in [0, 1]. Memory O(N²).
    """
    n = z.shape[0]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, n)
    d2 = squared_distances(z)
    d2 = d2 - torch.eye(n, device=z.device, dtype=z.dtype)  # self strictly first, even with duplicates
    idx = d2.topk(k, dim=1, largest=False).indices  # [N, k], sorted ascending
    nn_mask = torch.zeros(n, n, device=z.device, dtype=z.dtype).scatter_(1, idx, 1.0)  # row i = N_k(i)
    r = nn_mask * nn_mask.T if reciprocal else nn_mask
    overlap = r @ r.T  # |R_i ∩ R_j|
    w = r * overlap / r.sum(dim=1, keepdim=True)  # |R_i| ≥ 1 (self)
    if query_expansion:
        kq = max(1, (k + 1) // 2)
        q = torch.zeros(n, n, device=z.device, dtype=z.dtype).scatter_(1, idx[:, :kq], 1.0 / kq)
        w = q @ w
    w = (w + w.T) / 2
    return w.fill_diagonal_(1.0).clamp_(0.0, 1.0)


def median_sigma(z: torch.Tensor) -> float:
    """Median heuristic for the kernel width: σ = median off-diagonal ‖z_i − z_j‖².

    Raw patch features have ‖z_i − z_j‖² in the hundreds, so a fixed σ = 1 makes w_p ≈ 0 for every
    pair and leaves only the contextual term; the median keeps w_p informative at any feature scale.
    """
    d2 = squared_distances(z)
    n = z.shape[0]
    off = d2[~torch.eye(n, dtype=torch.bool, device=z.device)]
    return max(float(off.median()), 1e-12)


def pseudo_labels(z: torch.Tensor, sigma: float | None, k: int, alpha: float) -> torch.Tensor:
    """w = α·w_p + (1−α)·w_c from the (EMA) embeddings z̄ [N, D]: [N, N], symmetric, in [0, 1], diagonal 1.

    Computed without gradient (the targets are labels, not part of the graph). ``sigma=None``: median heuristic.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    with torch.no_grad():
        z = z.detach()
        if sigma is None:
            sigma = median_sigma(z)
        w = alpha * pairwise_similarity(z, sigma) + (1.0 - alpha) * contextual_similarity(z, k)
        return w.fill_diagonal_(1.0).clamp_(0.0, 1.0)


def relaxed_contrastive_loss(z: torch.Tensor, w: torch.Tensor, margin: float) -> torch.Tensor:
    """Relaxed contrastive loss on the online embeddings z [N, D] with soft labels w [N, N].

    d_ij = ‖z_i − z_j‖, δ_ij = d_ij / mean_{j≠i} d_ij (row-normalised, scale invariant),
    L = mean_{i, j≠i} [ w_ij·δ_ij² + (1 − w_ij)·relu(m − δ_ij)² ]. Gradients flow through the normaliser.
    """
    n = z.shape[0]
    if n < 2:
        raise ValueError("relaxed_contrastive_loss needs at least 2 samples")
    off = 1.0 - torch.eye(n, device=z.device, dtype=z.dtype)
    d = torch.sqrt(squared_distances(z) + 1e-10) * off  # eps keeps the sqrt gradient finite at 0
    mean = d.sum(dim=1, keepdim=True) / (n - 1)
    delta = d / mean.clamp_min(_EPS)
    w = w.to(dtype=z.dtype)
    per_pair = w * delta.pow(2) + (1.0 - w) * Fn.relu(margin - delta).pow(2)
    return (per_pair * off).sum() / (n * (n - 1))


class ReConPatch(nn.Module):
    """Trainable part of ReConPatch: ``representation`` g (nn.Linear d→d', identity init) and
    ``projection`` h (Linear d'→hidden, ReLU, Linear hidden→proj_dim; hidden defaults to d')."""

    def __init__(self, in_dim: int, out_dim: int | None = None, proj_dim: int = 128, proj_hidden: int | None = None):
        super().__init__()
        out_dim = out_dim or in_dim
        hidden = proj_hidden or out_dim
        self.in_dim, self.out_dim, self.proj_dim = in_dim, out_dim, proj_dim
        self.representation = _identity_linear(in_dim, out_dim)
        self.projection = nn.Sequential(nn.Linear(out_dim, hidden), nn.ReLU(), nn.Linear(hidden, proj_dim))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """g(x): [N, d] → [N, d'] (the features the memory bank stores)."""
        return self.representation(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h(g(x)): [N, d] → [N, proj_dim] (the space of the contrastive loss)."""
        return self.projection(self.representation(x))

    def adapter(self) -> "PatchAdapter":
        """A ``PatchAdapter`` (CPU copy) holding g's current weights."""
        a = PatchAdapter(self.in_dim, self.out_dim)
        a.load_state_dict({f"representation.{k}": v.detach().cpu().clone()
                           for k, v in self.representation.state_dict().items()})
        return a


class PatchAdapter(nn.Module):
    """Inference-time g of ReConPatch: patch features [N, d] or maps [B, d, h, w] → d' features.

    State dict keys ``representation.weight`` [d', d] and ``representation.bias`` [d'] (the same keys as
    in ``ReConPatch``). Build with ``PatchAdapter(in_dim, out_dim)`` (identity init), or load with
    ``PatchAdapter.from_state_dict(sd)`` / ``PatchAdapter.load(path.safetensors)``; ``save(path)`` writes one.
    """

    def __init__(self, in_dim: int, out_dim: int | None = None):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim or in_dim
        self.representation = _identity_linear(self.in_dim, self.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # [B, d, h, w] → [B, d', h, w]
            return self.representation(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()
        return self.representation(x)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "PatchAdapter":
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        if "representation.weight" not in sd and "weight" in sd:
            sd = {f"representation.{k}": v for k, v in sd.items()}
        try:
            weight = sd["representation.weight"]
        except KeyError as e:
            raise ValueError(f"not a PatchAdapter state dict: keys {sorted(sd)}") from e
        out_dim, in_dim = weight.shape
        a = cls(in_dim, out_dim)
        a.load_state_dict({k: v for k, v in sd.items() if k.startswith("representation.")}, strict=True)
        return a

    @classmethod
    def load(cls, path: str | Path) -> "PatchAdapter":
        from safetensors.torch import load_file

        return cls.from_state_dict(load_file(str(path)))

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path))


__all__ = [
    "PatchAdapter", "ReConPatch", "contextual_similarity", "pairwise_similarity", "pseudo_labels",
    "relaxed_contrastive_loss", "squared_distances",
]
