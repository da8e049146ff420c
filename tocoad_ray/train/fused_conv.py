"""Convolution + bias + activation as one training op, for the folded convolutions of stage II.

After BatchNorm folding (``bn_folding``) each of F's convolutions is followed only by its
activation (ReLU6 in EfficientNet-Lite). Run as separate ops on a CPU, the activation is one more
pass over every activation map forward, and a stride-2 convolution with TensorFlow's "same"
padding copies its whole input into a padded tensor first; at 112×112 those passes cost more than
the convolution beside them. ``conv_act`` does both in one op:

* forward: oneDNN's convolution with the activation as a post-op
  (``mkldnn._convolution_pointwise``), or, when the next convolution will pad this output, the
  activation written straight into a zero-bordered buffer that convolution takes as it is;
* backward: the activation's gradient from its output y (ReLU6: pass where 0 < y < 6, the same
  set as 0 < x < 6), then the input and weight gradients in one ``convolution_backward`` call and
  the bias gradient as a plain sum where that is faster (oneDNN's 5×5 depthwise bias gradient
  took about half as long as the weight gradient itself).

The same function and gradients as ``act(conv2d(x, w, b))`` to float rounding (tested). The fused
path runs for fp32 CPU tensors outside autocast; on a GPU, in bf16/fp16, or without oneDNN the
plain ops run instead (cuDNN and autocast have their own fusions).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as Fn
from timm.layers.conv2d_same import pad_same
from timm.layers.padding import get_same_padding

ACTIVATIONS = ("relu6", "relu", "none")
_POST_OPS = {"relu6": ("hardtanh", [0.0, 6.0]), "relu": ("relu", []), "none": ("none", [])}
_PADDED = "_padded_buffer"  # on conv_act's output view: (the zero-bordered buffer, its (left, right, top, bottom))


def _has_pointwise_op() -> bool:
    try:
        torch.ops.mkldnn._convolution_pointwise  # noqa: B018 - a private op: absent from some builds
    except (AttributeError, RuntimeError):
        return False
    return True


_POINTWISE = _has_pointwise_op()


def fused_available(x: torch.Tensor) -> bool:
    """Whether ``conv_act`` runs its fused CPU op on ``x`` (fp32 on a CPU with oneDNN, no autocast)."""
    return (_POINTWISE and x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled and not torch.is_autocast_enabled("cpu"))


def _apply_act(z: torch.Tensor, act: str, out: torch.Tensor | None = None) -> torch.Tensor:
    if act == "relu6":
        return torch.clamp(z, 0.0, 6.0, out=out) if out is not None else Fn.relu6(z)
    if act == "relu":
        return torch.clamp_min(z, 0.0, out=out) if out is not None else Fn.relu(z)
    return out.copy_(z) if out is not None else z


def _act_grad(g: torch.Tensor, y: torch.Tensor, act: str) -> torch.Tensor:
    """∂L/∂z from ∂L/∂y and the activation's output y = act(z)."""
    if act == "relu6":
        return torch.ops.aten.hardtanh_backward(g, y, 0.0, 6.0)
    if act == "relu":
        return torch.ops.aten.threshold_backward(g, y, 0.0)
    return g


class _ConvAct(torch.autograd.Function):
    """y = act(conv2d(x, w, b)) [zero-padded by ``pad`` = (left, right, top, bottom)] on oneDNN."""

    @staticmethod
    def forward(ctx, x, w, b, stride, padding, dilation, groups, act, pad):
        attr, scalars = _POST_OPS[act] if pad is None else ("none", [])
        z = torch.ops.mkldnn._convolution_pointwise(x, w, b, list(padding), list(stride), list(dilation), groups,
                                                   attr, scalars, None)
        if pad is None:
            y = z
        else:  # act(z) into the interior of a zero-bordered buffer: the next convolution's padded input
            left, right, top, bottom = pad
            n, c, h, wd = z.shape
            fmt = torch.channels_last if z.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
            y = torch.empty((n, c, h + top + bottom, wd + left + right), dtype=z.dtype, device=z.device, memory_format=fmt)
            for strip in (y[:, :, :top], y[:, :, top + h:], y[:, :, top:top + h, :left], y[:, :, top:top + h, left + wd:]):
                strip.zero_()
            _apply_act(z, act, out=y[:, :, top:top + h, left:left + wd])
            del z
        ctx.conf = (list(stride), list(padding), list(dilation), groups, act, pad)
        ctx.save_for_backward(x, w, y if act != "none" else None)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w, y = ctx.saved_tensors
        stride, padding, dilation, groups, act, pad = ctx.conf
        if pad is not None:  # the border is constant zero: only the interior reaches z
            left, right, top, bottom = pad
            h, wd = gy.shape[-2] - top - bottom, gy.shape[-1] - left - right
            gy = gy[:, :, top:top + h, left:left + wd]
            y = y[:, :, top:top + h, left:left + wd] if y is not None else None
        g = _act_grad(gy, y, act)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gw = gb = None
        b_inside = need_b and _bias_grad_inside(w, groups)
        if need_x or need_w or b_inside:
            gx, gw, gb = torch.ops.aten.convolution_backward(g, x, w, [w.shape[0]] if b_inside else None, stride,
                                                             padding, dilation, False, [0, 0], groups,
                                                             [need_x, need_w, b_inside])
        if need_b and not b_inside:
            gb = g.sum((0, 2, 3))
        return gx, gw, gb, None, None, None, None, None, None


def _bias_grad_inside(w: torch.Tensor, groups: int) -> bool:
    """Whether oneDNN's backward computes the bias gradient faster than a separate sum: yes for
    3×3 depthwise convolutions (it sums on the way), no for 5×5 depthwise and 1×1 ones (there it
    added 20-35 % to the backward; measured on Lite0's stage-II shapes, 2-core AVX2 CPU)."""
    return groups > 1 and groups == w.shape[0] and tuple(w.shape[-2:]) == (3, 3)


def same_pad(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
             dilation: Sequence[int]) -> tuple[int, int, int, int]:
    """TensorFlow "same" padding of an input of ``size`` (h, w): (left, right, top, bottom), split as timm's ``pad_same``."""
    ph, pw = (get_same_padding(int(s), int(k), int(st), int(d)) for s, k, st, d in zip(size, kernel, stride, dilation))
    return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2


def conv_act(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int],
             dilation: Sequence[int], groups: int, act: str = "none",
             pad_next: tuple[Sequence[int], Sequence[int], Sequence[int]] | None = None) -> torch.Tensor:
    """act(conv2d(x, w, b, stride, padding, dilation, groups)), ``act`` one of relu6 | relu | none.

    ``pad_next`` = (kernel, stride, dilation) of the convolution expected to take this output with
    "same" padding: the result is then a view of a buffer already padded for it, which
    ``padded_input`` hands that convolution instead of padding a copy (anyone else sees the
    ordinary tensor)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if not fused_available(x):
        return _apply_act(Fn.conv2d(x, w, b, stride, padding, dilation, groups), act)
    if b is None:
        b = w.new_zeros(w.shape[0])
    pad = None
    if pad_next is not None:
        h, wd = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (w.shape[2 + i] - 1) - 1) // stride[i] + 1
                 for i in range(2)]
        pad = same_pad((h, wd), *pad_next)
        if not any(pad):
            pad = None
    y = _ConvAct.apply(x, w, b, tuple(stride), tuple(padding), tuple(dilation), groups, act, pad)
    if pad is None:
        return y
    left, right, top, bottom = pad
    view = y[:, :, top:y.shape[2] - bottom, left:y.shape[3] - right]
    setattr(view, _PADDED, (y, pad))
    return view


def padded_input(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """``x`` with TensorFlow "same" padding: the buffer ``conv_act`` already padded it in when ``x``
    is that buffer's interior with exactly this padding, else a padded copy (timm's ``pad_same``)."""
    base, base_pad = getattr(x, _PADDED, (None, None))  # set on this very tensor by conv_act
    if base is not None and base_pad == same_pad(x.shape[-2:], kernel, stride, dilation):
        return base
    return pad_same(x, kernel, stride, dilation)
