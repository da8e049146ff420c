"""Discriminative network D (ToCoAD §3.1, §4.1.3): an "inverse" of the feature extractor F.

D mirrors F's feature pyramid. Starting from F's deepest map it repeatedly reduces channels,
up-samples ×2 (to the next shallower map's size), concatenates that level's skip feature and
applies conv-BN-ReLU, until the shallowest level; a last up-sampling to the input size and a 1×1
conv give the 2-channel logits map ŷ_G (normal / anomalous) trained with the focal loss of eq. 2.

Built from the extractor's ``channels`` / ``reductions`` so the same code serves
EfficientNet-Lite0 (16/24/40/112/320 ch, strides 2..32) and WideResNet50 (64/256/512/1024/2048).
Decoder widths are the skip widths clamped to [``min_width``, ``max_width``] so the Lite0 decoder
stays small enough for CPU (about 1 M parameters) while the WRN50 decoder is capped at 256 ch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn
from torch import nn


def conv_bn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Discriminator(nn.Module):
    """D(F(I)) → logits [B, 2, H, W] at the input size.

    ``channels``/``reductions``: {layer: value} for the pyramid levels D consumes (e.g. every
    ``feature_info`` level of F up to the deepest layer used). Levels are ordered by reduction.
    """

    def __init__(self, channels: dict[str, int], reductions: dict[str, int], min_width: int = 16, max_width: int = 256):
        super().__init__()
        if not channels:
            raise ValueError("Discriminator needs at least one feature level")
        self.levels = sorted(channels, key=lambda l: reductions[l])  # shallow -> deep
        self.reductions = {l: int(reductions[l]) for l in self.levels}
        width = {l: int(min(max(channels[l], min_width), max_width)) for l in self.levels}
        deepest = self.levels[-1]
        self.reduce = conv_bn_relu(channels[deepest], width[deepest], k=1)
        self.fuse = nn.ModuleList()
        for i in range(len(self.levels) - 2, -1, -1):  # next shallower level each time
            l, prev = self.levels[i], self.levels[i + 1]
            self.fuse.append(conv_bn_relu(width[prev] + channels[l], width[l]))
        w0 = width[self.levels[0]]
        self.head = nn.Sequential(conv_bn_relu(w0, w0), nn.Conv2d(w0, 2, 1))

    def forward(self, feats: dict[str, torch.Tensor], out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """``feats``: F's maps (extra keys ignored). ``out_size``: (H, W) of the input image;
        default: shallowest map size × its reduction."""
        x = self.reduce(feats[self.levels[-1]])
        for block, l in zip(self.fuse, reversed(self.levels[:-1])):
            skip = feats[l]
            x = Fn.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        if out_size is None:
            r = self.reductions[self.levels[0]]
            out_size = (feats[self.levels[0]].shape[-2] * r, feats[self.levels[0]].shape[-1] * r)
        x = Fn.interpolate(x, size=tuple(out_size), mode="bilinear", align_corners=False)
        return self.head(x)
