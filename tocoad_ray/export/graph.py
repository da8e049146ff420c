"""The whole scoring path of an artifact as one torch module, for export.

images [B, 3, S, S] (preprocessed) → F (+ ReConPatch's g) → 3×3 aggregation → exact nearest bank
row per patch (eq. 8, squared distances as matrix products, the bank in chunks) → eq. 9 on each
image's most anomalous patch → s' upsampled to S × S and blurred (the same separable Gaussian as
``bank.scoring``). The bank is a buffer: float32, or the 8-bit codes with their ranges, decoded in
the graph exactly as faiss decodes them, so the exported file keeps the codes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn
from torch import nn

from ..bank.embedding import patch_embed
from ..bank.scoring import _blur_matrix

# eq. 9's b neighbours of c* are picked from this many candidates ranked by the matrix-product
# distances, then ranked again by direct distances: float32 rounding of the fast form cannot
# swap the b-th and (b+1)-th neighbour
_RERANK_EXTRA = 8


class ScoringGraph(nn.Module):
    def __init__(self, body: nn.Module, order: list[int], patch_size: int, adapter: nn.Module | None,
                 bank: torch.Tensor, sq8_trained: torch.Tensor | None, num_neighbors: int, blur_sigma: float,
                 input_size: int, chunk: int = 8192):
        super().__init__()
        self.body = body.eval()
        self.order = list(order)
        self.patch_size = patch_size
        self.adapter = adapter.eval() if adapter is not None else None
        self.quantized = sq8_trained is not None
        if self.quantized:
            d = bank.shape[1]
            if bank.dtype != torch.uint8 or sq8_trained.shape != (2 * d,):
                raise ValueError(f"an 8-bit bank needs uint8 codes [M, d] and ranges [2d], got {bank.dtype} "
                                 f"{tuple(bank.shape)} and {tuple(sq8_trained.shape)}")
            self.register_buffer("codes", bank.contiguous())
            self.register_buffer("vmin", sq8_trained[:d].float().contiguous())
            self.register_buffer("vdiff", sq8_trained[d:].float().contiguous())
        else:
            self.register_buffer("bank", bank.float().contiguous())
        self.M = int(bank.shape[0])
        self.b = min(int(num_neighbors), self.M)
        self.chunk = max(1, int(chunk))
        self.size = int(input_size)
        self.sigma = float(blur_sigma)
        if self.sigma > 0:
            m = _blur_matrix(self.size, self.sigma)
            self.register_buffer("blur", m.contiguous())  # (x @ M) blurs rows; M.T @ x blurs columns
            self.register_buffer("blur_t", m.T.contiguous())

    def vectors(self) -> torch.Tensor:
        """The bank as float32 [M, d]; 8-bit: faiss QT_8bit decoding, vmin + (code + 0.5) / 255 · vdiff."""
        if not self.quantized:
            return self.bank
        return self.vmin + (self.codes.float() + 0.5) / 255.0 * self.vdiff

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.body(x)
        emb = patch_embed([feats[i] for i in self.order], self.patch_size)  # [B, d, h, w]
        if self.adapter is not None:
            emb = self.adapter.representation(emb.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return emb

    def nearest(self, q: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distance to and index of the nearest bank row for every query, bank in chunks
        so the [N, chunk] distance block stays bounded for large banks."""
        q_sq = (q * q).sum(1, keepdim=True)
        mins, args = [], []
        for s in range(0, self.M, self.chunk):
            e = min(s + self.chunk, self.M)
            d2 = q_sq - 2.0 * (q @ bank[s:e].T) + bank_sq[s:e]
            m, a = d2.min(1)
            mins.append(m)
            args.append(a + s)
        if len(mins) == 1:
            return mins[0], args[0]
        m, k = torch.stack(mins, 1).min(1)
        return m, torch.stack(args, 1).gather(1, k[:, None])[:, 0]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.embed(images)
        B, d, h, w = emb.shape
        q = emb.permute(0, 2, 3, 1).reshape(-1, d)  # image-major rows, as flatten_patches
        bank = self.vectors()
        bank_sq = (bank * bank).sum(1)
        d2, nn_idx = self.nearest(q, bank, bank_sq)
        s_prime = d2.clamp_min(0.0).sqrt()  # eq. 8
        sp = s_prime.reshape(B, h * w)

        # eq. 9 on the most anomalous patch p (s' = s_max, nearest bank row c*)
        arg = sp.argmax(1)
        rows = torch.arange(B, device=images.device) * (h * w) + arg
        s_max = s_prime[rows]
        p = q[rows]
        c_star = bank[nn_idx[rows]]
        dc = (c_star * c_star).sum(1, keepdim=True) - 2.0 * (c_star @ bank.T) + bank_sq  # [B, M]
        n_cand = min(self.b + _RERANK_EXTRA, self.M)
        _, cand = torch.topk(dc, n_cand, dim=1, largest=False)
        exact = ((bank[cand] - c_star[:, None, :]) ** 2).sum(-1)  # [B, n_cand]
        _, pos = torch.topk(exact, self.b, dim=1, largest=False)
        nb = cand.gather(1, pos)
        dist = (bank[nb] - p[:, None, :]).pow(2).sum(-1).sqrt()  # [B, b]
        m = torch.maximum(dist.max(1).values, s_max)
        weight = 1.0 - torch.exp(s_max - m) / torch.exp(dist - m[:, None]).sum(1)
        scores = weight * s_max

        # pixel map: bilinear to S × S, then the separable blur
        t = Fn.interpolate(sp.reshape(B, 1, h, w), size=(self.size, self.size), mode="bilinear", align_corners=False)
        if self.sigma > 0:
            t = torch.matmul(self.blur_t, torch.matmul(t, self.blur))
        return scores, t[:, 0]
