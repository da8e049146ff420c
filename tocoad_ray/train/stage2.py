"""Stage II — negative-guided contrastive learning (NCL, ToCoAD §3.2, eq. 3-6).

F is fine-tuned together with the contrastive network C while the stage-I discriminator D is
frozen (eval mode, ``requires_grad=False``) but differentiable, so the negative term's gradient
flows *through* D into F:

    L_ncl = λ · L_sym(views of I) + (1 − λ) · L_focal(D(F(I_G)), y_G)          (eq. 6)

L_sym (eq. 5) over M views from the augmentation set S; D(p, z) (eq. 3) with stop-gradient on z
(``target="simsiam"``) or with z from an EMA copy of F + C's adapters/projector
(``target="byol"``, decay ``ema_decay``). SGD(momentum, weight decay) on F + C, cosine annealing
over the epochs (stepped per epoch).

Design decisions:

* F's BatchNorm layers stay in eval mode (running statistics frozen; their affine weights are
  trained). D was fitted on F's eval-mode statistics, the memory bank is later built in eval
  mode, and batches of 16 normal images would give noisy statistics; with frozen statistics the
  M views and the G batch also go through F in one concatenated forward pass. C's BN layers are
  in train mode (SimSiam needs them against collapse); each view is projected separately.
* "NCL only" ablation (``stage1.enabled=False``): there is no D, so L = L_sym (λ is not applied to
  a lone term; the loss scale only interacts with the LR).
* Variants (``stage2.contrast``, ``stage2.preserve``; docs/methods.md "Stage II variants"): L_sym per
  corresponding patch of the two crops instead of on pooled features (``losses.dense_sym_loss``),
  and an anchor term β·L_pres that keeps F near the pretrained F0 (``losses.feature_preservation``
  on the bank layers, or ``losses.weight_preservation``, L2-SP), so the full objective is
  L = λ·L_sym + (1 − λ)·L_focal + β·L_pres. F0 is the extractor as the trainer receives it
  (pretrained, unchanged by stage I); a resumed run rebuilds it the same way.
* Collapse guard: each epoch reports ``proj_std``, the batch std of the L2-normalised projector
  output z (mean over dims and layers); ≈ 1/sqrt(proj_dim) when healthy, → 0 on collapse. Below
  0.1/sqrt(proj_dim) a warning is logged.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..config import Config
from ..data import Preprocess
from ..models.backbone import FeatureExtractor
from ..models.contrastive import ContrastiveHead
from ..models.discriminator import Discriminator
from .base import StageTrainer
from .bn_folding import fold_frozen_bn
from .losses import (
    dense_sym_loss,
    feature_preservation,
    projection_std,
    sym_loss,
    weight_preservation,
)
from .precision import StepCompute, out_of_place_activations
from .schedule import per_image
from .seeding import seeded_init
from .stage1 import pixel_loss, stage1_sample
from .views import ViewAugment

logger = logging.getLogger(__name__)


def stage2_sample(image_uint8: np.ndarray, preprocess: Preprocess, rng: np.random.Generator, num_views: int = 2,
                  augment: ViewAugment | None = None, generator=None) -> dict[str, Any]:
    """One training row of stage II: {"views": [M, 3, S, S] views v^1..v^M of the normal image
    (augmentation set S), "boxes": [M, 4] their crop boxes (``ViewAugment.sample``), and G's sample
    "image" [3, S, S] / "mask" [1, S, S] when ``generator`` is given}. Draw order from ``rng``:
    the M view seeds, then G."""
    augment = augment or ViewAugment(preprocess.size)
    base = (preprocess.image(image_uint8) * preprocess.std + preprocess.mean).clamp_(0.0, 1.0)
    seeds = rng.integers(0, 2**62, size=num_views)
    views, boxes = zip(*(augment.sample(base, int(s)) for s in seeds))
    row: dict[str, Any] = {"views": torch.stack([(v - preprocess.mean) / preprocess.std for v in views]),
                           "boxes": torch.stack(boxes)}
    if generator is not None:
        row["image"], row["mask"] = stage1_sample(image_uint8, generator, preprocess, rng)
    return row


def make_stage2_batch(images_uint8: list[np.ndarray], preprocess: Preprocess,
                      rng: np.random.Generator | Sequence[np.random.Generator], num_views: int = 2,
                      augment: ViewAugment | None = None, generator=None) -> dict[str, Any]:
    """{"views": M tensors [B, 3, S, S] (views v^1..v^M of the normal images, augmentation set S),
    "boxes": M tensors [B, 4] (their crop boxes), "image"/"mask": G's samples as in
    ``make_stage1_batch`` (absent when ``generator`` is None)}.
    ``rng``: one per image (as the trainers use it) or one shared."""
    augment = augment or ViewAugment(preprocess.size)
    rows = [stage2_sample(img, preprocess, r, num_views, augment, generator)
            for img, r in zip(images_uint8, per_image(rng, len(images_uint8)))]
    return collate_stage2(rows)


def collate_stage2(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``stage2_sample`` rows into the batch ``Stage2Trainer`` takes."""
    batch: dict[str, Any] = {k: list(torch.stack([r[k] for r in rows], dim=1).unbind(0))  # M × [B, ...]
                             for k in ("views", "boxes")}
    if "image" in rows[0]:
        batch["image"] = torch.stack([r["image"] for r in rows])
        batch["mask"] = torch.stack([r["mask"] for r in rows])
    return batch


def _freeze_bn_stats(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class Stage2Net(nn.Module):
    """F + C in one forward, so data-parallel training (DDP) can wrap the trainable part of stage
    II as one module: x (M views then G's batch, concatenated) → F's pyramid, and per layer of
    ``layers`` the projections z and predictions p of the M views ([B, D], or [B, D, h, w] per
    cell when ``dense``)."""

    def __init__(self, extractor: FeatureExtractor, head: ContrastiveHead, layers: list[str], dense: bool = False):
        super().__init__()
        self.extractor, self.head, self.layers, self.dense = extractor, head, list(layers), bool(dense)

    def forward(self, x: torch.Tensor, num_views: int, batch: int):
        feats = self.extractor(x)  # one pass: F's BN statistics are frozen
        project, predict = ((self.head.project_dense, self.head.predict_dense) if self.dense
                            else (self.head.project, self.head.predict))
        zs, ps = {}, {}
        for layer in self.layers:
            f = feats[layer]
            zs[layer] = [project(layer, f[i * batch:(i + 1) * batch]) for i in range(num_views)]
            ps[layer] = [predict(z) for z in zs[layer]]
        return feats, zs, ps


class Stage2Trainer(StageTrainer):
    """Fine-tunes F (+ trains C) with L_ncl; ``discriminator=None`` → NCL-only (L = L_sym)."""

    stage = 2
    name = "stage2"

    def __init__(self, cfg: Config, extractor: FeatureExtractor, device: str | torch.device = "cpu",
                 discriminator: Discriminator | None = None):
        self.cfg, self.scfg, self.device = cfg, cfg.stage2, torch.device(device)
        s = self.scfg
        if s.target not in ("simsiam", "byol"):
            raise ValueError(f"stage2.target must be simsiam or byol, got {s.target!r}")
        if s.num_views < 2:
            raise ValueError(f"stage2.num_views (M) must be >= 2, got {s.num_views}")
        if not 0.0 <= s.lam <= 1.0:
            raise ValueError(f"stage2.lam (λ) must be in [0, 1], got {s.lam}")
        self.layers = list(cfg.backbone.stage2_layers)
        missing = [l for l in self.layers if l not in extractor.channels]
        if missing:
            raise ValueError(f"extractor lacks stage2 layer(s) {missing}; build it with train.extractor.build_extractor")
        self.compute = StepCompute(cfg.compute, self.device)
        self.extractor = self.compute.module(extractor.to(self.device))
        self.discriminator = discriminator
        if discriminator is not None:
            self.compute.module(discriminator.to(self.device)).eval()
            for p in discriminator.parameters():
                p.requires_grad_(False)
        self._fold_batchnorm(extractor, discriminator)
        # gradients pass through F's and D's activations: in place, autograd would copy each input
        out_of_place_activations(extractor)
        if discriminator is not None:
            out_of_place_activations(discriminator)
        self.head = seeded_init(cfg.seed, 2, lambda: ContrastiveHead(
            {l: extractor.channels[l] for l in self.layers}, proj_dim=s.proj_dim, pred_hidden=s.pred_hidden)).to(self.device)
        self.compute.module(self.head)
        self.target_extractor = self.target_head = None
        if s.target == "byol":
            self.target_extractor = copy.deepcopy(self.extractor).eval()
            self.target_head = copy.deepcopy(self.head)
            for p in list(self.target_extractor.parameters()) + list(self.target_head.parameters()):
                p.requires_grad_(False)
        self.dense = s.contrast == "dense"
        self.net = Stage2Net(self.extractor, self.head, self.layers, dense=self.dense)
        self.net_forward: nn.Module = self.net  # DDP-wrapped by distribute()
        # F0 for the anchor term: the extractor as received (pretrained; stage I leaves F unchanged)
        self.anchor_extractor = self.anchor_weights = None
        self.preserve_layers = list(cfg.backbone.layers)
        if s.preserve == "feature":
            missing = [l for l in self.preserve_layers if l not in extractor.channels]
            if missing:
                raise ValueError(f"extractor lacks bank layer(s) {missing} for stage2.preserve=feature")
            self.anchor_extractor = copy.deepcopy(self.extractor).eval()
            for p in self.anchor_extractor.parameters():
                p.requires_grad_(False)
        elif s.preserve == "l2sp":
            self.anchor_weights = [p.detach().clone() for p in self.extractor.parameters()]
        # F's params reaching no layer a loss reads (timm runs blocks past it) get no grad: frozen, DDP awaits none
        read = list(extractor.layers) if discriminator is not None else self.layers + (
            self.preserve_layers if s.preserve == "feature" else [])
        unused = set(self.extractor.unused_parameters(read))
        # stage2.trainable_from: F's layers before it stay frozen, and the backward pass ends there
        frozen = set(self.extractor.parameters_before(s.trainable_from)) if s.trainable_from else set()
        for n, p in self.extractor.named_parameters():
            p.requires_grad_(n not in unused and n not in frozen)
        # L2-SP replaces F's decay toward 0 by the pull toward w0; C keeps its weight decay
        f_decay = 0.0 if s.preserve == "l2sp" else s.weight_decay
        self.optimizer = torch.optim.SGD([
            {"params": list(self.extractor.parameters()), "weight_decay": f_decay},
            {"params": list(self.head.parameters()), "weight_decay": s.weight_decay},
        ], lr=s.lr, momentum=s.momentum)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(1, s.epochs))
        self.epoch = 0

    def _fold_batchnorm(self, extractor: FeatureExtractor, discriminator: Discriminator | None) -> None:
        """F's BN statistics are frozen and D is frozen: fold their BNs into the convolutions
        (``bn_folding``; same outputs, no per-activation BN pass), checked on a small example."""
        if not self.cfg.compute.fold_batchnorm:
            return
        size = self.cfg.data.input_size
        x = self.compute.batch(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)))
        fuse = self.cfg.compute.fuse_activations
        fold_frozen_bn(extractor, lambda f: f(x), fuse_act=fuse)
        if discriminator is not None:
            modes = {m: m.training for m in extractor.modules()}
            extractor.eval()  # a module in training mode would update F's BN statistics here
            with torch.no_grad():
                feats = extractor(x)
            for m, mode in modes.items():
                m.training = mode
            fold_frozen_bn(discriminator, lambda d: d(feats, out_size=(size, size)), fuse_act=fuse)

    def distribute(self, wrap) -> None:
        """Data-parallel training: ``wrap`` (e.g. ``ray.train.torch.prepare_model``) wraps F + C
        (``Stage2Net``) in DDP; the frozen D and the EMA target stay local (no gradients)."""
        self.net_forward = wrap(self.net)

    # --- modes ------------------------------------------------------------------------------------
    def _set_modes(self) -> None:
        self.extractor.train()
        _freeze_bn_stats(self.extractor)
        self.head.train()
        if self.discriminator is not None:
            self.discriminator.eval()
        if self.target_head is not None:
            self.target_extractor.eval()
            self.target_head.train()  # BN batch statistics as in the online projector
        if self.anchor_extractor is not None:
            self.anchor_extractor.eval()

    # --- step -------------------------------------------------------------------------------------
    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Forward pass → {"loss", "loss_sym", ["loss_neg"], ["loss_pres"]} tensors and the online z's ("z")."""
        self._set_modes()  # F's BN statistics frozen whoever calls (F = F0 exactly at initialisation)
        with self.compute.autocast():
            out = self._losses(batch)
        return out

    def _losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        s = self.scfg
        views = [self.compute.batch(v) for v in batch["views"]]
        m, b = len(views), views[0].shape[0]
        use_neg = self.discriminator is not None and batch.get("image") is not None
        xs = views + ([self.compute.batch(batch["image"])] if use_neg else [])
        x = torch.cat(xs)
        if self.compute.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats, zs_l, ps_l = self.net_forward(x, m, b)
        if self.target_extractor is not None:
            with torch.no_grad():
                tfeats = self.target_extractor(torch.cat(views))
        if self.dense and "boxes" not in batch:
            raise ValueError("stage2.contrast=dense needs the views' crop boxes (batch['boxes'], from make_stage2_batch)")
        boxes = [bx.to(self.device) for bx in batch["boxes"]] if self.dense else None
        target_project = None
        if self.target_head is not None:
            target_project = self.target_head.project_dense if self.dense else self.target_head.project
        l_sym, zs_all, per_layer = 0.0, [], {}
        for layer in self.layers:
            zs, ps = zs_l[layer], ps_l[layer]
            if target_project is not None:
                with torch.no_grad():
                    tz = [target_project(layer, tfeats[layer][i * b:(i + 1) * b]) for i in range(m)]
            else:
                tz = zs  # SimSiam: stop-gradient inside neg_cosine
            term = dense_sym_loss(ps, tz, boxes) if self.dense else sym_loss(ps, tz)
            per_layer[layer] = term.detach()
            l_sym = l_sym + term
            z0 = zs[0]
            zs_all.append(z0.permute(0, 2, 3, 1).reshape(-1, z0.shape[1]) if self.dense else z0)
        l_sym = l_sym / len(self.layers)
        out = {"loss_sym": l_sym, "z": zs_all, "sym_layers": per_layer}
        l_pres = self.preservation(feats, views[0], b)
        if use_neg:
            gfeats = {k: v[m * b:] for k, v in feats.items()}
            logits = self.discriminator(gfeats, out_size=tuple(xs[-1].shape[-2:]))
            l_neg = pixel_loss(logits.float(), batch["mask"].to(self.device, non_blocking=True), s.loss,
                               self.cfg.stage1.focal_gamma, self.cfg.stage1.focal_alpha)
            out["loss_neg"] = l_neg
            out["loss"] = s.lam * l_sym + (1.0 - s.lam) * l_neg  # eq. 6
        else:
            out["loss"] = l_sym  # NCL only: no D
        if l_pres is not None:
            out["loss_pres"] = l_pres
            out["loss"] = out["loss"] + s.preserve_weight * l_pres  # + β·L_pres
        return out

    def preservation(self, feats: dict[str, torch.Tensor] | None = None, first_view: torch.Tensor | None = None,
                     batch: int | None = None) -> torch.Tensor | None:
        """L_pres of ``stage2.preserve`` (None for "none"). ``feature``: on the first view's bank-layer
        features (``feats`` from the online forward, rows [0, batch)) against F0's."""
        if self.anchor_weights is not None:
            return weight_preservation(list(self.extractor.parameters()), self.anchor_weights)
        if self.anchor_extractor is None:
            return None
        with torch.no_grad():
            anchor = self.anchor_extractor(first_view)
        return feature_preservation({l: feats[l][:batch] for l in self.preserve_layers}, anchor, self.preserve_layers)

    def train_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One step; metrics come back as detached tensors (non-finite loss: raised at the epoch's end)."""
        out = self.losses(batch)  # sets the train/eval modes
        self.compute.step(out["loss"], self.optimizer)
        if self.target_head is not None:
            self._ema_update()
        metrics = {k: v.detach() for k, v in out.items() if k.startswith("loss")}
        metrics.update({f"sym/{l}": v for l, v in out["sym_layers"].items()})
        metrics["proj_std"] = sum(projection_std(z) for z in out["z"]) / len(out["z"])
        return metrics

    @torch.no_grad()
    def _ema_update(self) -> None:
        tau = self.scfg.ema_decay
        for online, target in ((self.extractor, self.target_extractor), (self.head, self.target_head)):
            for po, pt in zip(online.parameters(), target.parameters()):
                pt.mul_(tau).add_(po.detach(), alpha=1.0 - tau)
            for bo, bt in zip(online.buffers(), target.buffers()):
                bt.copy_(bo)

    def epoch_end_metrics(self, means: dict[str, float], steps: int) -> dict[str, Any]:
        std = means.get("proj_std", float("nan"))
        healthy = 1.0 / math.sqrt(self.scfg.proj_dim)
        if std < 0.1 * healthy:
            logger.warning("stage2 epoch %d: projector output std %.4g < 0.1/sqrt(%d) = %.4g: representation "
                           "collapse suspected", self.epoch, std, self.scfg.proj_dim, 0.1 * healthy)
        return {"proj_std": std, "proj_std_healthy": healthy, "collapse_warning": bool(std < 0.1 * healthy)}

    # --- state ------------------------------------------------------------------------------------
    def model_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {f"F.{k}": v.contiguous() for k, v in self.extractor.body.state_dict().items()}
        sd.update({f"C.{k}": v for k, v in self.head.state_dict().items()})
        if self.target_head is not None:
            sd.update({f"TF.{k}": v.contiguous() for k, v in self.target_extractor.body.state_dict().items()})
            sd.update({f"TC.{k}": v for k, v in self.target_head.state_dict().items()})
        return sd

    def load_model_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

        self.extractor.body.load_state_dict(part("F."))
        self.head.load_state_dict(part("C."))
        if self.target_head is not None:
            self.target_extractor.body.load_state_dict(part("TF."))
            self.target_head.load_state_dict(part("TC."))

    def _retarget_schedule(self) -> bool:
        want = max(1, self.scfg.epochs)
        if self.scheduler.T_max == want:
            return False
        self.scheduler.T_max = want
        return True
