"""Stage I — discriminative network pre-training (DNP, ToCoAD §3.1, §4.1.3).

F (pre-trained, frozen: eval mode, no gradients) extracts the pyramid of a pseudo-anomaly image
I_G = G(I); D maps it to ŷ_G and is trained with L_dis = L_focal(ŷ_G, y_G) (eq. 2), or plain CE for
the ablation (``stage1.loss="ce"``). Adam(lr), MultiStepLR ×``lr_decay`` at 80 % / 90 % of epochs.
"""
from __future__ import annotations

import collections
from typing import Sequence

import numpy as np
import torch

from ..config import Config
from ..data import Preprocess
from ..models.backbone import FeatureExtractor
from ..models.discriminator import Discriminator
from .base import StageTrainer, milestones
from .losses import ce_loss, focal_loss
from .precision import StepCompute, usual_layout
from .schedule import per_image
from .seeding import seeded_init


def stage1_sample(image_uint8: np.ndarray, generator, preprocess: Preprocess, rng: np.random.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One element of T_G (eq. 1): (normalised I_G = G(I) [3, S, S], 0/1 mask y_G [1, S, S])."""
    out, mask = generator(image_uint8, rng)
    return preprocess.image(out), preprocess.mask(mask)


def make_stage1_batch(images_uint8: list[np.ndarray], generator, preprocess: Preprocess,
                      rng: np.random.Generator | Sequence[np.random.Generator]) -> dict[str, torch.Tensor]:
    """T_G batch (eq. 1): each image → G(image, rng) → Preprocess. ``rng``: one per image (as the
    trainers use it) or one shared. Returns {"image": [B, 3, S, S] normalised I_G, "mask":
    [B, 1, S, S] 0/1 y_G} on the cpu."""
    pairs = [stage1_sample(img, generator, preprocess, r) for img, r in zip(images_uint8, per_image(rng, len(images_uint8)))]
    return {"image": torch.stack([x for x, _ in pairs]), "mask": torch.stack([m for _, m in pairs])}


def pixel_loss(logits: torch.Tensor, mask: torch.Tensor, kind: str, gamma: float, alpha: float) -> torch.Tensor:
    if kind == "focal":
        return focal_loss(logits, mask, gamma=gamma, alpha=alpha)
    if kind == "ce":
        return ce_loss(logits, mask)
    raise ValueError(f"unknown loss {kind!r}; use focal or ce")


def build_discriminator(cfg: Config, extractor: FeatureExtractor) -> Discriminator:
    """D over every level of ``extractor`` (seeded from ``cfg.seed``)."""
    return seeded_init(cfg.seed, 1, lambda: Discriminator(extractor.channels, extractor.reductions))


class Stage1Trainer(StageTrainer):
    """Trains D on G's samples over frozen F."""

    stage = 1
    name = "stage1"

    def __init__(self, cfg: Config, extractor: FeatureExtractor, device: str | torch.device = "cpu",
                 discriminator: Discriminator | None = None):
        self.cfg, self.scfg, self.device = cfg, cfg.stage1, torch.device(device)
        self.extractor = extractor.to(self.device).eval()
        for p in self.extractor.parameters():
            p.requires_grad_(False)
        self.compute = StepCompute(cfg.compute, self.device)
        self.compute.module(self.extractor)
        self.discriminator = self.compute.module((discriminator or build_discriminator(cfg, extractor)).to(self.device))
        self.d_forward: torch.nn.Module = self.discriminator  # DDP-wrapped by distribute()
        self.optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=self.scfg.lr)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones(self.scfg.epochs), gamma=self.scfg.lr_decay)
        self.epoch = 0

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.compute.batch(batch["image"])
        m = batch["mask"].to(self.device, non_blocking=True)
        with self.compute.autocast():
            with torch.no_grad():
                self.extractor.eval()
                feats = self.extractor(x)
            logits = self.d_forward(feats, out_size=tuple(x.shape[-2:]))
        return pixel_loss(logits.float(), m, self.scfg.loss, self.scfg.focal_gamma, self.scfg.focal_alpha)

    def distribute(self, wrap) -> None:
        """Data-parallel training: ``wrap`` (e.g. ``ray.train.torch.prepare_model``) wraps D in DDP;
        F is frozen and stays local. State dicts keep the unwrapped D's names."""
        self.d_forward = wrap(self.discriminator)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One step; the loss comes back as a detached tensor (non-finite: raised at the epoch's end)."""
        self.discriminator.train()
        loss = self.loss(batch)
        self.compute.step(loss, self.optimizer)
        return {"loss": loss.detach()}

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return usual_layout(self.discriminator.state_dict())

    def load_model_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.discriminator.load_state_dict(sd)

    def _retarget_schedule(self) -> bool:
        want = collections.Counter(milestones(self.scfg.epochs))
        if self.scheduler.milestones == want:
            return False
        self.scheduler.milestones = want
        return True
