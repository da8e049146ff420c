"""torch Dataset over a list of samples: decode, preprocess, and return image + aligned mask."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from .image_io import read_image, read_mask
from .samples import Sample
from .transforms import Preprocess


def has_masks(samples: Sequence[Sample]) -> bool:
    """True when at least one anomalous sample has a pixel mask (pixel metrics are meaningful)."""
    return any(s.label == 1 and s.mask_path is not None for s in samples)


class ImageDataset(Dataset):
    """Items are ``{"image": 3xSxS float, "mask": 1xSxS float (zeros without a mask), "label": int,
    "index": int}``; the default DataLoader collate batches them."""

    def __init__(self, samples: Sequence[Sample], preprocess: Preprocess):
        self.samples = list(samples)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        rgb = read_image(s.path)
        image = self.preprocess.image(rgb)
        if s.mask_path is not None:
            mask = self.preprocess.mask(read_mask(s.mask_path), rgb.shape[:2], s.mask_path)
        else:
            size = self.preprocess.size
            mask = torch.zeros(1, size, size)
        return {"image": image, "mask": mask, "label": int(s.label), "index": int(index)}
