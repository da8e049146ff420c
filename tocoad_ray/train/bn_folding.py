"""Frozen BatchNorm folded into the convolution before it, for training with frozen statistics.

Stage II trains F with its BatchNorm statistics frozen (eval mode, affine weights trained), and D
runs frozen in eval mode while gradients flow through it. An eval-mode BN is an affine map per
channel, y = s·x + t with s = γ / sqrt(σ² + ε), t = β − μ·s, so a convolution followed by it equals
one convolution with weight W·s and bias t (+ s·b_conv). Folded, the network makes no separate
pass over every activation for the BN, forward or backward: on a CPU that pass over the 112×112
maps cost more than the convolution itself (measured in docs/benchmarks.md, "Training
throughput"). γ, β and W stay the trained parameters: gradients reach them through W·s and t, and
state dicts are unchanged.

Pairs are a Conv2d (plain or timm's ``Conv2dSame``) directly followed by a BatchNorm child of the
same parent (``nn.BatchNorm2d`` or timm's ``BatchNormAct2d``, whose dropout and activation still
run). Registration order is not data flow, so ``fold_frozen_bn`` checks the folded module against
the unfolded one on an example and undoes the folding where they differ. A BN in training mode
(updating its statistics) makes its pair run unfolded, so the folding is exact in either mode.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as Fn
from torch import nn

from .fused_conv import conv_act, padded_input

logger = logging.getLogger(__name__)

try:  # timm's TF "same" padding convolution and fused BN + activation
    from timm.layers import BatchNormAct2d
    from timm.layers.conv2d_same import Conv2dSame, conv2d_same
except ImportError:  # pragma: no cover - timm is a dependency; kept optional for the plain-torch case
    BatchNormAct2d = Conv2dSame = conv2d_same = None  # type: ignore[assignment]


def _bn_eval_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    s = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return s, bn.bias - bn.running_mean * s


class _FoldedConv:
    """Mixin put in front of a conv's class: W·s and t from its BN when that BN is in eval mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.__dict__["_fold_bn"]  # a plain attribute: not a submodule, so not in state_dict twice
        base = self.__dict__["_fold_base"]
        if bn.training:
            return base.forward(self, x)
        s, t = _bn_eval_affine(bn)
        w = self.weight * s.reshape(-1, 1, 1, 1)
        b = t if self.bias is None else t + self.bias * s
        same = Conv2dSame is not None and issubclass(base, Conv2dSame)
        act = self.__dict__.get("_fold_act")
        if act is None:
            if same:
                return conv2d_same(x, w, b, self.stride, self.padding, self.dilation, self.groups)
            return nn.Conv2d._conv_forward(self, x, w, b)
        padding = self.padding
        if same:  # the previous fused op may have written x into a buffer padded for this conv
            x, padding = padded_input(x, self.kernel_size, self.stride, self.dilation), (0, 0)
        return conv_act(x, w, b, self.stride, padding, self.dilation, self.groups, act, self.__dict__.get("_pad_next"))


class _FoldedBN:
    """Mixin put in front of a BN's class: in eval mode the conv before it already applied it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.__dict__["_fold_base"]
        if self.training:
            return base.forward(self, x)
        if BatchNormAct2d is not None and issubclass(base, BatchNormAct2d) and not self.__dict__.get("_act_fused"):
            return self.act(self.drop(x))
        return x


_CLASSES: dict[tuple[type, type], type] = {}


def _folded_class(mixin: type, base: type) -> type:
    key = (mixin, base)
    if key not in _CLASSES:
        name = f"Folded{base.__name__}"
        _CLASSES[key] = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name})
        globals()[name] = _CLASSES[key]  # importable by name, so a folded module still pickles
    return _CLASSES[key]


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    convs = (nn.Conv2d,) if Conv2dSame is None else (nn.Conv2d, Conv2dSame)
    return (type(conv) in convs and isinstance(bn, nn.BatchNorm2d) and type(bn) in
            ((nn.BatchNorm2d,) if BatchNormAct2d is None else (nn.BatchNorm2d, BatchNormAct2d))
            and bn.affine and bn.track_running_stats and bn.running_var is not None
            and bn.num_features == conv.out_channels)


def _pairs(module: nn.Module) -> list[tuple[nn.Module, nn.Module, nn.Module | None]]:
    """(conv, bn, the sibling registered after bn or None) for every foldable pair."""
    out = []
    for parent in module.modules():
        children = list(parent.children())
        out += [(a, b, c) for a, b, c in zip(children, children[1:], children[2:] + [None]) if _foldable(a, b)]
    return out


_FUSABLE_ACTS = {nn.ReLU6: "relu6", nn.ReLU: "relu", nn.Identity: "none"}


def _fusable_act(conv: nn.Module, bn: nn.Module) -> str | None:
    """The activation ``fused_conv.conv_act`` can run inside ``conv`` in place of BN's own (a
    BatchNormAct2d without dropout, ReLU6 / ReLU / none), or None."""
    if BatchNormAct2d is None or not isinstance(bn, BatchNormAct2d) or not isinstance(bn.drop, nn.Identity):
        return None
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        return None
    return _FUSABLE_ACTS.get(type(bn.act))


def _fold(conv: nn.Module, bn: nn.Module, after: nn.Module | None = None, fuse_act: bool = False) -> None:
    for m, mixin in ((conv, _FoldedConv), (bn, _FoldedBN)):
        m.__dict__["_fold_base"] = type(m)
        m.__class__ = _folded_class(mixin, type(m))
    conv.__dict__["_fold_bn"] = bn
    act = _fusable_act(conv, bn) if fuse_act else None
    if act is not None:
        conv.__dict__["_fold_act"], bn.__dict__["_act_fused"] = act, True
        base = after.__dict__.get("_fold_base", type(after)) if after is not None else None
        if Conv2dSame is not None and base is not None and issubclass(base, Conv2dSame):
            # the next conv pads this output: write it into a buffer already padded for that conv
            conv.__dict__["_pad_next"] = (tuple(after.kernel_size), tuple(after.stride), tuple(after.dilation))


def unfold_bn(module: nn.Module) -> None:
    """Undo ``fold_frozen_bn`` on every pair inside ``module``."""
    for m in module.modules():
        base = m.__dict__.pop("_fold_base", None)
        if base is not None:
            m.__class__ = base
            for key in ("_fold_bn", "_fold_act", "_act_fused", "_pad_next"):
                m.__dict__.pop(key, None)


def fold_frozen_bn(module: nn.Module, check: Callable[[nn.Module], object], atol: float = 1e-4,
                   fuse_act: bool = False) -> int:
    """Fold every conv → BN pair of ``module`` (see the module docstring); returns the number of
    pairs folded. ``fuse_act``: the BN's ReLU6 / ReLU runs inside the convolution too
    (``fused_conv.conv_act``: one op forward and backward, padded ahead for a "same"-padding conv
    registered next). ``check(module)`` runs the module on an example and returns its output (a
    tensor or a dict of them); run in eval mode without gradients before and after folding, a
    difference above ``atol`` (relative to the output's scale) undoes the folding."""
    pairs = _pairs(module)
    if not pairs:
        return 0
    was_training = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            ref = _flat(check(module))
            for conv, bn, after in pairs:
                _fold(conv, bn, after, fuse_act)
            got = _flat(check(module))
        err = max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) for a, b in zip(ref, got))
    finally:
        for m, t in was_training.items():
            m.training = t
    if not err <= atol:
        unfold_bn(module)
        logger.warning("BatchNorm folding changed %s's output by %.2g (relative); training it unfolded",
                       type(module).__name__, err)
        return 0
    return len(pairs)


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out.float()]
    if isinstance(out, dict):
        return [v.float() for _, v in sorted(out.items())]
    return [v.float() for v in out]
