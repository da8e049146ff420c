"""Images → patch features for the memory bank: F (+ optional ReConPatch g) + aggregation.

One object used by fit, evaluate, predict and the Serve backbone deployment, so every path turns
an image into exactly the same vectors.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .bank.embedding import flatten_patches, patch_embed
from .models.backbone import FeatureExtractor, resolve_device


class PatchModel(nn.Module):
    """φ(I) = [g](aggregate(F_l2(I), F_l3(I))) as [B·h·w, d] rows, image-major."""

    def __init__(self, extractor: FeatureExtractor, patch_size: int = 3, adapter: nn.Module | None = None,
                 device: str | torch.device = "cpu"):
        super().__init__()
        self.extractor = extractor.eval()
        self.adapter = adapter.eval() if adapter is not None else None
        self.patch_size = patch_size
        self.device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
        self.to(self.device)

    @torch.inference_mode()
    def embed_grid(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] normalised → [B, d, h, w] on CPU."""
        feats = self.extractor(images.to(self.device, non_blocking=True))
        emb = patch_embed([feats[l] for l in self.extractor.layers], self.patch_size)
        if self.adapter is not None:
            b, d, h, w = emb.shape
            emb = self.adapter(flatten_patches(emb)).reshape(b, h, w, -1).permute(0, 3, 1, 2)
        return emb.float().cpu()

    def embed(self, images: torch.Tensor) -> tuple[np.ndarray, tuple[int, int]]:
        """[B, 3, S, S] → ([B·h·w, d] float32 numpy, (h, w))."""
        emb = self.embed_grid(images)
        return flatten_patches(emb).numpy(), tuple(emb.shape[-2:])


def load_adapter(path: str | Path) -> nn.Module:
    from .models.reconpatch import PatchAdapter

    return PatchAdapter.load(path)
