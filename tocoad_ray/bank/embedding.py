"""Locally aware patch features for the memory bank (PatchCore; ToCoAD §3.3 "layer 2 and layer 3").

Each layer's map is averaged over a p×p neighbourhood (stride 1, so the grid is kept), deeper maps
are upsampled bilinearly to the finest grid, and the layers are concatenated: for Lite0
``blocks.2`` (40 ch) + ``blocks.4`` (112 ch) gives 152-dim patches on a stride-8 grid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn


def patch_embed(features: list[torch.Tensor], patch_size: int = 3) -> torch.Tensor:
    """[B, C_l, h_l, w_l] per layer → [B, ΣC_l, h_0, w_0] (grid of the first, finest layer)."""
    pad = patch_size // 2
    h, w = features[0].shape[-2:]
    out = []
    for f in features:
        f = Fn.avg_pool2d(f, kernel_size=patch_size, stride=1, padding=pad) if patch_size > 1 else f
        if f.shape[-2:] != (h, w):
            f = Fn.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
        out.append(f)
    return torch.cat(out, dim=1)


def flatten_patches(emb: torch.Tensor) -> torch.Tensor:
    """[B, d, h, w] → [B·h·w, d], row-major per image (row index = b·h·w + y·w + x)."""
    b, d, h, w = emb.shape
    return emb.permute(0, 2, 3, 1).reshape(b * h * w, d)
