"""Contrastive learning network C (ToCoAD §3.2, Fig. 4, §4.1.3), SimSiam style.

For each chosen layer l of F (``backbone.stage2_layers``; layer-3/4 analogues, Tables 4/8: the
layers are *not* concatenated): adaptive average pooling → per-layer linear *input adapter* to a
common width (the largest channel count among the layers; identity for layers already that wide)
→ one projector shared by all layers (3-layer MLP with BN, as SimSiam; last BN without affine)
giving z → predictor giving p. Sharing one projector across layers needs a common input width,
hence the adapters (a linear map followed by the projector's first linear layer adds no capacity
beyond a per-layer first layer; it only lets the rest of the projector be shared).

Predictor: ``pred_hidden > 0`` → SimSiam's 2-layer bottleneck MLP (proj_dim → pred_hidden →
proj_dim, BN+ReLU in between; the default, ``Stage2Config.pred_hidden=128``);
``pred_hidden == 0`` → the paper's 1-layer MLP (a single Linear proj_dim → proj_dim).
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn
from torch import nn


def _key(layer: str) -> str:
    return layer.replace(".", "_")


class ContrastiveHead(nn.Module):
    """C: ``project(layer, f) → z`` (adapter + shared projector), ``predict(z) → p``."""

    def __init__(self, channels: dict[str, int], proj_dim: int = 512, pred_hidden: int = 128, hidden_dim: int | None = None):
        super().__init__()
        if not channels:
            raise ValueError("ContrastiveHead needs at least one layer")
        self.layers = list(channels)
        self.proj_dim = int(proj_dim)
        d = max(channels.values())
        self.in_dim = d
        self.adapters = nn.ModuleDict({_key(l): nn.Identity() if c == d else nn.Linear(c, d) for l, c in channels.items()})
        h = hidden_dim or proj_dim
        self.projector = nn.Sequential(
            nn.Linear(d, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(inplace=True),
            nn.Linear(h, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(inplace=True),
            nn.Linear(h, proj_dim, bias=False), nn.BatchNorm1d(proj_dim, affine=False),
        )
        if pred_hidden and pred_hidden > 0:
            self.predictor = nn.Sequential(
                nn.Linear(proj_dim, pred_hidden, bias=False), nn.BatchNorm1d(pred_hidden), nn.ReLU(inplace=True),
                nn.Linear(pred_hidden, proj_dim),
            )
        else:
            self.predictor = nn.Linear(proj_dim, proj_dim)

    def project(self, layer: str, feat: torch.Tensor) -> torch.Tensor:
        """f_l [B, C_l, h, w] → z [B, proj_dim] (adaptive avg pool → adapter → shared projector)."""
        v = Fn.adaptive_avg_pool2d(feat, 1).flatten(1)
        return self.projector(self.adapters[_key(layer)](v))

    def predict(self, z: torch.Tensor) -> torch.Tensor:
        return self.predictor(z)

    def project_dense(self, layer: str, feat: torch.Tensor) -> torch.Tensor:
        """Dense variant: the same adapter + projector applied at every cell (a 1×1 convolution
        MLP; BN statistics over all B·h·w cells): f_l [B, C_l, h, w] → z [B, proj_dim, h, w]."""
        b, c, h, w = feat.shape
        z = self.projector(self.adapters[_key(layer)](feat.permute(0, 2, 3, 1).reshape(b * h * w, c)))
        return z.reshape(b, h, w, -1).permute(0, 3, 1, 2)

    def predict_dense(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, D, h, w] → p [B, D, h, w], the predictor at every cell."""
        b, d, h, w = z.shape
        return self.predictor(z.permute(0, 2, 3, 1).reshape(b * h * w, d)).reshape(b, h, w, d).permute(0, 3, 1, 2)

    def forward(self, feats: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        zs = {l: self.project(l, feats[l]) for l in self.layers}
        return zs, {l: self.predict(z) for l, z in zs.items()}
