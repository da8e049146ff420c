"""The view augmentation set S of stage II (§3.2): random resized crop, colour jitter, grayscale."""
from __future__ import annotations

import torch

from ..config import Config


class ViewAugment:
    """Augmentation set S (§3.2, as SimSiam [40]): RandomResizedCrop to the input size (scale
    ``scale``, paper 0.2-1), ColorJitter(j, j, j, j/4) with p = 0.8 (paper j = 0.4),
    RandomGrayscale p = 0.2; torchvision.transforms.v2 on a [0, 1] float 3xHxW tensor.

    ``sample`` also returns the crop box (top, left, height, width) as fractions of the input
    image: the dense stage-II variant pairs feature cells of two views through their boxes."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.2, 1.0), jitter: float = 0.4):
        from torchvision.transforms import v2

        self.size = int(size)
        self.crop = v2.RandomResizedCrop(self.size, scale=tuple(scale), antialias=True)
        colour = [v2.RandomGrayscale(p=0.2)]
        if jitter > 0:
            colour.insert(0, v2.RandomApply([v2.ColorJitter(jitter, jitter, jitter, jitter / 4)], p=0.8))
        self.colour = v2.Compose(colour)

    def sample(self, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(view, box): deterministic for ``seed``; the global torch RNG is left untouched."""
        from torchvision.transforms.v2 import functional as TF

        h, w = x.shape[-2:]
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also queue a seed for every lazily
            # initialised accelerator (a formatted stack each time: ~10 % of making a sample)
            torch.default_generator.manual_seed(int(seed))
            p = self.crop.make_params([x])  # same draws, in the same order, as the Compose it replaces
            view = TF.resized_crop(x, p["top"], p["left"], p["height"], p["width"], [self.size, self.size], antialias=True)
            view = self.colour(view).clamp(0.0, 1.0)
        box = torch.tensor([p["top"] / h, p["left"] / w, p["height"] / h, p["width"] / w], dtype=torch.float32)
        return view, box

    def __call__(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        return self.sample(x, seed)[0]


def view_augment(cfg: Config, size: int) -> ViewAugment:
    """S as ``cfg.stage2`` sets it (crop scale, jitter strength)."""
    s = cfg.stage2
    return ViewAugment(size, scale=(s.crop_scale_min, 1.0), jitter=s.color_jitter)
