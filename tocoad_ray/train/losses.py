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


def projection_std(z: torch.Tensor) -> torch.Tensor:
    """Collapse guard: mean over dims of the batch std of L2-normalised z (a 0-d tensor on z's
    device, so a step need not wait for it). SimSiam collapse → 0; healthy ≈ 1/sqrt(dim)."""
    if z.shape[0] < 2:
        return torch.tensor(float("nan"), device=z.device)
    return Fn.normalize(z.detach().float(), dim=1).std(dim=0).mean()


# --- stage II variants (docs/methods.md "Stage II variants") ----------------------------------------------
def correspondence(box_a: torch.Tensor, box_b: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each feature cell of view a lies in view b.

    ``box_*`` [B, 4]: the crops (top, left, height, width) as fractions of the source image; both
    views are resized to the same size, so their feature grids are h × w. Cell (y, x) of view a has
    its centre at image point (top_a + height_a·(y + ½)/h, left_a + width_a·(x + ½)/w); in view b
    that is u = (point − origin_b) / size_b ∈ [0, 1]² when the cell lies inside b's crop. Returns
    ``grid`` [B, h, w, 2] (x, y in grid_sample's [−1, 1] with align_corners=False, i.e. 2u − 1)
    and ``valid`` [B, h, w] (inside b's crop)."""
    dev = box_a.device
    cy = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) / h
    cx = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) / w
    ta, la, ha, wa = (box_a[:, i, None] for i in range(4))
    tb, lb, hb, wb = (box_b[:, i, None] for i in range(4))
    uy = (ta + ha * cy - tb) / hb  # [B, h]
    ux = (la + wa * cx - lb) / wb  # [B, w]
    grid = torch.stack(torch.broadcast_tensors(ux[:, None, :], uy[:, :, None]), dim=-1) * 2.0 - 1.0
    valid = ((uy >= 0) & (uy <= 1))[:, :, None] & ((ux >= 0) & (ux <= 1))[:, None, :]
    return grid, valid


def dense_neg_cosine(p_a: torch.Tensor, z_b: torch.Tensor, box_a: torch.Tensor, box_b: torch.Tensor) -> torch.Tensor:
    """D(p, z) (eq. 3) per patch: −cos between p_a at each cell of view a and SG(z_b) read (bilinear)
    at the same image point in view b, averaged over the cells that lie in both crops.
    ``p_a``, ``z_b`` [B, D, h, w]. No overlap at all gives 0 (with a graph, so backward works)."""
    grid, valid = correspondence(box_a, box_b, *p_a.shape[-2:])
    zb = Fn.grid_sample(z_b.detach(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    cos = (Fn.normalize(p_a, dim=1) * Fn.normalize(zb, dim=1)).sum(dim=1)  # [B, h, w]
    v = valid.to(cos.dtype)  # a masked mean, so no host sync on a GPU step
    return -(cos * v).sum() / v.sum().clamp_min(1.0)


def dense_sym_loss(ps: list[torch.Tensor], zs: list[torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
    """L_sym (eq. 5) with eq. 4's D(p, z) taken per corresponding patch (``dense_neg_cosine``):
    the positives are the same image point seen in two crops (PixPro's pixel-level consistency,
    Xie et al. 2021; DenseCL, Wang et al. 2021), so the term acts on the patch features the memory
    bank uses rather than on a global average that is nearly identical across a product's images."""
    m = len(ps)
    if m < 2 or len(zs) != m or len(boxes) != m:
        raise ValueError(f"dense_sym_loss needs M >= 2 predictions, projections and boxes, got {len(ps)}, {len(zs)}, {len(boxes)}")
    total = 0.0
    for i in range(m):
        for j in range(i + 1, m):
            total = total + 0.5 * dense_neg_cosine(ps[i], zs[j], boxes[i], boxes[j]) \
                + 0.5 * dense_neg_cosine(ps[j], zs[i], boxes[j], boxes[i])
    return total * 2.0 / (m * (m - 1))


def feature_preservation(feats: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], layers: list[str]) -> torch.Tensor:
    """L_pres (feature): mean over ``layers`` of ‖F(x)_l − F0(x)_l‖² / ‖F0(x)_l‖², the relative
    squared change of the patch features from the frozen pretrained F0 on the same images
    (feature-map distillation as in DELTA, Li et al. 2019, and ReContrast's frozen-encoder anchor,
    Guo et al. 2023). 0 while F = F0."""
    total = 0.0
    for l in layers:
        f, f0 = feats[l], anchor[l].detach()
        total = total + (f - f0).pow(2).sum() / f0.pow(2).sum().clamp_min(1e-12)
    return total / len(layers)


def weight_preservation(params: list[torch.Tensor], anchor: list[torch.Tensor]) -> torch.Tensor:
    """L_pres (l2sp): ½ Σ ‖w − w0‖² over F's weights, the L2-SP penalty toward the pretrained
    starting point (Li, Grandvalet & Davoine 2018) instead of weight decay toward 0. 0 while F = F0."""
    return 0.5 * sum((p - p0).pow(2).sum() for p, p0 in zip(params, anchor))
