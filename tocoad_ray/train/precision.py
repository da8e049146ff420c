"""How a training step runs on its device (``compute`` config): memory layout and precision.

* channels_last: F, D and the image batches in NHWC, the layout oneDNN (CPU) and cuDNN (GPU) run
  convolutions fastest in; a layout, not a computation, so losses match the NCHW run to float
  rounding. State dicts leave in the usual layout (``contiguous``), so checkpoints, collectives and
  artifacts never see the difference.
* bf16 / fp16: the forward pass and losses under ``torch.autocast``; parameters, gradients and the
  optimizer stay fp32. fp16 (CUDA only) scales the loss so small gradients do not underflow.
* activations out of place where gradients pass through them (``out_of_place_activations``).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

import torch
from torch import nn

from ..config import ComputeConfig, ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class StepCompute:
    """Layout and precision of one trainer's steps on ``device``."""

    def __init__(self, cfg: ComputeConfig, device: torch.device):
        self.device = torch.device(device)
        self.channels_last = bool(cfg.channels_last)
        self.precision = cfg.precision
        if self.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError(f"compute.precision fp16 needs a CUDA device (this run trains on {self.device.type}); "
                              "use bf16 or fp32")
        self.dtype = _DTYPES.get(self.precision)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None

    def module(self, m: nn.Module) -> nn.Module:
        """``m`` in the step's layout (in place; the Parameter objects stay the same)."""
        return m.to(memory_format=torch.channels_last) if self.channels_last else m

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """An image batch [B, C, H, W] on the device in the step's layout."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def autocast(self) -> ContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backward pass and optimizer step (scaled under fp16)."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()


def usual_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with every tensor in the default (NCHW-contiguous) layout; no copy where it already is."""
    return {k: v.contiguous() for k, v in sd.items()}


def out_of_place_activations(module: nn.Module) -> int:
    """Set ``inplace=False`` on every activation of ``module`` that has the flag (timm's ReLU6 in
    EfficientNet-Lite, ReLU). Where a gradient passes through an in-place activation, autograd
    copies its input first (the backward needs it), so "in place" costs a copy of every
    activation map; out of place the same values come without it (stage II: 6-8 % per step on a
    2-core CPU). Returns how many were changed."""
    n = 0
    for m in module.modules():
        if isinstance(getattr(m, "inplace", None), bool) and m.inplace and not isinstance(m, nn.Dropout):
            m.inplace = False
            n += 1
    return n

