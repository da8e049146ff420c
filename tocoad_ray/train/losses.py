"""Losses of ToCoAD: focal loss L_focal (eq. 2), cross-entropy (ablation), D(p, z) (eq. 3) and
the symmetric multi-view loss L_sym (eq. 4-5)."""
from __future__ import annotations

import torch
import torch.nn.functional as Fn


def _target(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if logits.ndim != 4 or logits.shape[1] != 2:
        raise ValueError(f"logits must be [B, 2, H, W], got {tuple(logits.shape)}")
    if mask.ndim == 4:
        mask = mask[:, 0]
    if mask.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match logits {tuple(logits.shape)}")
    return (mask > 0.5).long()


def focal_loss(logits: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0, alpha: float = 0.25) -> torch.Tensor:
    """L_focal (eq. 2): mean over pixels of −α_t (1 − p_t)^γ log p_t.

    ``logits`` [B, 2, H, W] (softmax over the 2 channels: 0 normal, 1 anomalous); ``mask``
    [B, 1, H, W] or [B, H, W] of 0/1. α_t = ``alpha`` for anomalous pixels, 1 − ``alpha`` for
    normal ones (``alpha=None``: no weighting). γ = 0 reduces to α-weighted cross-entropy.
    """
    t = _target(logits, mask)
    logp_t = Fn.log_softmax(logits.float(), dim=1).gather(1, t[:, None])[:, 0]
    p_t = logp_t.exp()
    loss = -((1.0 - p_t).clamp_min(0.0) ** gamma) * logp_t if gamma else -logp_t
    if alpha is not None:
        loss = loss * torch.where(t == 1, alpha, 1.0 - alpha)
    return loss.mean()


def ce_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain (unweighted) pixel-wise cross-entropy, the ablation of L_focal."""
    return Fn.cross_entropy(logits.float(), _target(logits, mask))


def neg_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, z) (eq. 3) = −(p/‖p‖₂)·(SG(z)/‖z‖₂), averaged over the batch; stop-gradient on z."""
    return -(Fn.normalize(p, dim=1) * Fn.normalize(z.detach(), dim=1)).sum(dim=1).mean()


def sym_loss(ps: list[torch.Tensor], zs: list[torch.Tensor]) -> torch.Tensor:
    """L_sym (eq. 5) over M views: 2/(M(M−1)) · Σ_{i<j} L_cossim(f^i, f^j), with
    L_cossim = ½ D(p_i, SG z_j) + ½ D(p_j, SG z_i) (eq. 4). For M = 2 this is eq. 4 itself."""
    m = len(ps)
    if m < 2 or len(zs) != m:
        raise ValueError(f"sym_loss needs M >= 2 predictions and as many projections, got {len(ps)} and {len(zs)}")
    total = 0.0
    for i in range(m):
        for j in range(i + 1, m):
            total = total + 0.5 * neg_cosine(ps[i], zs[j]) + 0.5 * neg_cosine(ps[j], zs[i])
    return total * 2.0 / (m * (m - 1))


def projection_std(z: torch.Tensor) -> float:
    """Collapse guard: mean over dims of the batch std of L2-normalised z. SimSiam collapse → 0;
    healthy ≈ 1/sqrt(dim)."""
    if z.shape[0] < 2:
        return float("nan")
    return float(Fn.normalize(z.detach().float(), dim=1).std(dim=0).mean())
