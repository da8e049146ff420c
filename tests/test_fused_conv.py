"""Convolution + activation as one op (``train/fused_conv.py``): the same values and gradients as
the separate ops, the pre-padded buffer taken only by the convolution it was padded for."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as Fn

from tocoad_ray.train.fused_conv import conv_act, fused_available, padded_input, same_pad

ACTS = {"relu6": Fn.relu6, "relu": Fn.relu, "none": lambda z: z}
CASES = {  # (in channels, out channels, kernel, stride, padding, groups, size)
    "pointwise": (8, 16, 1, 1, 0, 1, 12),
    "depthwise 3x3": (16, 16, 3, 1, 1, 16, 12),
    "depthwise 5x5 stride 2": (16, 16, 5, 2, 0, 16, 13),
    "grouped": (8, 8, 3, 1, 1, 2, 10),
}


def _tensors(cin, cout, k, groups, size, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(3, cin, size, size, generator=g) * 3).contiguous(memory_format=fmt)
    w = (torch.randn(cout, cin // groups, k, k, generator=g) * 0.5).contiguous(memory_format=fmt)
    b = torch.randn(cout, generator=g)
    return x, w, b


def _grads(fn, x, w, b):
    x, w, b = (t.detach().clone().requires_grad_(t is not None) for t in (x, w, b))
    out = fn(x, w, b)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()  # an uneven upstream gradient
    return out.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("channels_last", [True, False])
def test_conv_act_matches_conv_then_activation(act, case, channels_last):
    cin, cout, k, s, p, groups, size = CASES[case]
    x, w, b = _tensors(cin, cout, k, groups, size, channels_last)
    assert fused_available(x)  # the fused op itself is under test
    want = _grads(lambda x, w, b: ACTS[act](Fn.conv2d(x, w, b, s, p, 1, groups)), x, w, b)
    got = _grads(lambda x, w, b: conv_act(x, w, b, (s, s), (p, p), (1, 1), groups, act), x, w, b)
    for name, a, c in zip(("y", "dx", "dw", "db"), want, got):
        assert torch.allclose(c, a, rtol=1e-4, atol=1e-4 * float(a.abs().max())), name
    if act != "none":  # values on both sides of the activation's kinks, so the masks are exercised
        assert float((want[0] == 0).float().mean()) > 0.05
    if act == "relu6":
        assert float((want[0] == 6).float().mean()) > 0.01


def test_input_without_gradient_and_missing_bias():
    x, w, _ = _tensors(8, 16, 3, 1, 10, True)
    w = w.requires_grad_()
    y = conv_act(x, w, None, (1, 1), (1, 1), (1, 1), 1, "relu6")
    y.sum().backward()
    w2 = w.detach().clone().requires_grad_()
    Fn.relu6(Fn.conv2d(x, w2, None, 1, 1)).sum().backward()
    assert torch.allclose(w.grad, w2.grad, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("size", [12, 13])
@pytest.mark.parametrize("next_kernel", [3, 5])
def test_output_padded_for_the_next_same_convolution(size, next_kernel):
    """A pointwise conv + ReLU6 whose output a stride-2 "same" depthwise conv takes (timm's
    InvertedResidual): the buffer is padded ahead, the next conv takes it without a copy, and
    values and gradients equal pad-after-activation."""
    x, w, b = _tensors(8, 16, 1, 1, size, True)
    _, wd, bd = _tensors(16, 16, next_kernel, 16, size, True, seed=1)
    nxt = ((next_kernel, next_kernel), (2, 2), (1, 1))
    reused = []

    def fused(x, w, b):
        y = conv_act(x, w, b, (1, 1), (0, 0), (1, 1), 1, "relu6", pad_next=nxt)
        assert y.shape == (3, 16, size, size)  # callers see the ordinary output
        xp = padded_input(y, *nxt)
        reused.append(xp is y._padded_buffer[0])
        return conv_act(xp, wd, bd, (2, 2), (0, 0), (1, 1), 16, "relu6") + y.mean()  # y used elsewhere too

    def plain(x, w, b):
        y = Fn.relu6(Fn.conv2d(x, w, b))
        left, right, top, bottom = same_pad(y.shape[-2:], *nxt)
        return Fn.relu6(Fn.conv2d(Fn.pad(y, (left, right, top, bottom)), wd, bd, 2, 0, 1, 16)) + y.mean()

    want, got = _grads(plain, x, w, b), _grads(fused, x, w, b)
    assert reused == [True]
    for name, a, c in zip(("out", "dx", "dw", "db"), want, got):
        assert torch.allclose(c, a, rtol=1e-4, atol=1e-4 * float(a.abs().max())), name


def test_a_buffer_padded_for_another_convolution_is_not_taken():
    x, w, b = _tensors(8, 16, 1, 1, 12, True)
    y = conv_act(x, w, b, (1, 1), (0, 0), (1, 1), 1, "relu6", pad_next=((3, 3), (2, 2), (1, 1)))
    for kernel, stride in (((5, 5), (2, 2)), ((3, 3), (1, 1))):  # a different padding than the buffer's
        xp = padded_input(y, kernel, stride, (1, 1))
        assert xp is not y._padded_buffer[0]
        left, right, top, bottom = same_pad((12, 12), kernel, stride, (1, 1))
        assert torch.equal(xp, Fn.pad(Fn.relu6(Fn.conv2d(x, w, b)), (left, right, top, bottom)))
    plain = Fn.relu6(Fn.conv2d(x, w, b))
    assert padded_input(plain, (3, 3), (2, 2), (1, 1)).shape == (3, 16, 13, 13)  # an untagged tensor: padded


def test_same_pad_matches_timm():
    from timm.layers.conv2d_same import pad_same

    for size, k, s in ((112, 3, 2), (56, 5, 2), (14, 5, 2), (13, 3, 2), (7, 5, 1)):
        x = torch.ones(1, 1, size, size)
        left, right, top, bottom = same_pad((size, size), (k, k), (s, s), (1, 1))
        assert torch.equal(pad_same(x, (k, k), (s, s)), Fn.pad(x, (left, right, top, bottom)))


def test_autocast_and_inference_mode_take_the_plain_ops():
    x, w, b = _tensors(8, 16, 3, 1, 10, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_available(x)
        y = conv_act(x, w, b, (1, 1), (1, 1), (1, 1), 1, "relu6")
        ref = Fn.relu6(Fn.conv2d(x, w, b, 1, 1))
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)
    with torch.inference_mode():
        y = conv_act(x, w, b, (1, 1), (1, 1), (1, 1), 1, "relu6", pad_next=((3, 3), (2, 2), (1, 1)))
        assert padded_input(y, (3, 3), (2, 2), (1, 1)) is y._padded_buffer[0]
    assert torch.allclose(y, Fn.relu6(Fn.conv2d(x, w, b, 1, 1)), atol=1e-5)


def test_unknown_activation_is_refused():
    x, w, b = _tensors(8, 16, 1, 1, 4, True)
    with pytest.raises(ValueError, match="act must be one of"):
        conv_act(x, w, b, (1, 1), (0, 0), (1, 1), 1, "gelu")
