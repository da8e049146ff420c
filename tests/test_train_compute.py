"""How training steps run (``compute``): BatchNorm folding, channels-last, precision, batch
prefetching, the end-of-epoch finiteness check; each must leave what is computed unchanged."""
from __future__ import annotations

import copy
import logging
import threading

import numpy as np
import pytest
import torch
from torch import nn

from tocoad_ray.config import ConfigError, load_config, replace
from tocoad_ray.data import Preprocess
from tocoad_ray.models.discriminator import Discriminator
from tocoad_ray.synth import AnomalyGenerator
from tocoad_ray.train import Stage1Trainer, Stage2Trainer, ViewAugment, build_extractor, make_stage1_batch, make_stage2_batch
from tocoad_ray.train.bn_folding import fold_frozen_bn, unfold_bn
from tocoad_ray.train.schedule import prefetched
from tocoad_ray.train.stage2 import _freeze_bn_stats

from .test_tocoad_train import images, tiny_cfg

REFERENCE = {"channels_last": False, "fold_batchnorm": False}  # NCHW, BN as its own pass


def _with_compute(cfg, **compute):
    cfg = copy.deepcopy(cfg)
    cfg.compute = replace(cfg.compute, **compute)
    return cfg


def _pretrained(cfg):
    cfg = copy.deepcopy(cfg)
    cfg.backbone = replace(cfg.backbone, weights="pretrained")
    try:
        return build_extractor(cfg)
    except Exception as e:  # pragma: no cover - offline weights absent
        pytest.skip(f"pretrained lite0 unavailable: {e}")


@pytest.mark.parametrize("fuse_act", [False, True])
def test_folding_keeps_outputs_gradients_and_state_dict(fuse_act):
    cfg = tiny_cfg()
    f = _pretrained(cfg).to(memory_format=torch.channels_last)
    g = copy.deepcopy(f)
    x = (torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1).contiguous(
        memory_format=torch.channels_last)
    keys = list(f.state_dict())
    assert fold_frozen_bn(f, lambda m: m(x), fuse_act=fuse_act) > 20
    fused = [m for m in f.modules() if "_fold_act" in m.__dict__]
    # with fuse_act every ReLU6 of Lite0 runs inside its conv, and the convs before a stride-2
    # "same" depthwise conv write their output pre-padded for it
    assert (len(fused) > 20 and sum("_pad_next" in m.__dict__ for m in fused) >= 3) if fuse_act else not fused
    assert list(f.state_dict()) == keys  # the same parameters under the same names
    for m in (f, g):  # stage II's modes: F in training mode, its BN statistics frozen
        m.train()
        _freeze_bn_stats(m)
    out_f, out_g = f(x), g(x)
    for k in out_g:
        assert torch.allclose(out_f[k], out_g[k], rtol=1e-4, atol=1e-4 * float(out_g[k].detach().abs().max())), k
    sum(o.square().mean() for o in out_f.values()).backward()
    sum(o.square().mean() for o in out_g.values()).backward()
    grads = dict(g.named_parameters())
    checked = 0
    for name, p in f.named_parameters():
        q = grads[name]
        if q.grad is None:
            assert p.grad is None, name
            continue
        scale = float(q.grad.abs().max()) or 1.0
        assert torch.allclose(p.grad, q.grad, atol=2e-3 * scale), name  # BN's γ, β and the conv weights alike
        checked += 1
    assert checked > 50
    # a BN in training mode (statistics updating) runs its pair unfolded: exact either way
    f.train(), g.train()
    assert torch.allclose(f(x)["blocks.2"], g(x)["blocks.2"], atol=1e-5)
    unfold_bn(f)
    assert not any("Folded" in type(m).__name__ or "_fold_act" in m.__dict__ or "_act_fused" in m.__dict__
                   for m in f.modules())


def test_folding_is_undone_where_registration_order_is_not_data_flow(caplog):
    class BnFirst(nn.Module):  # conv registered before bn, but bn runs first
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

        def forward(self, x):
            return self.conv(self.bn(x))

    m = BnFirst()
    x = torch.randn(2, 4, 8, 8)
    want = m.eval()(x)
    with caplog.at_level(logging.WARNING):
        assert fold_frozen_bn(m, lambda mod: mod(x)) == 0
    assert "training it unfolded" in caplog.text
    assert type(m.conv) is nn.Conv2d and type(m.bn) is nn.BatchNorm2d
    assert torch.allclose(m(x), want)


def test_stage2_trainer_leaves_F_and_D_statistics_alone():
    """Building the trainer runs a folding check on F and D; a fresh F is in training mode and a
    forward pass there would move its BN statistics."""
    cfg = tiny_cfg()
    f = build_extractor(cfg)
    d = Discriminator(f.channels, f.reductions)
    assert f.training and d.training
    before = {k: v.clone() for k, v in {**f.state_dict(), **{f"D.{k}": v for k, v in d.state_dict().items()}}.items()}
    Stage2Trainer(cfg, f, "cpu", discriminator=d)
    after = {**f.state_dict(), **{f"D.{k}": v for k, v in d.state_dict().items()}}
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def _steps(cfg, n: int = 3) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    f = _pretrained(cfg)
    pre = Preprocess(cfg.data, f.mean, f.std)
    gen = AnomalyGenerator("perlin", normal_prob=0.0)
    b1 = make_stage1_batch(images(2, 64), gen, pre, np.random.default_rng(0))
    t1 = Stage1Trainer(cfg, f, "cpu")
    l1 = [float(t1.train_step(b1)["loss"]) for _ in range(n)]
    b2 = make_stage2_batch(images(2, 64), pre, np.random.default_rng(1), num_views=2, augment=ViewAugment(64),
                           generator=gen)
    t2 = Stage2Trainer(cfg, f, "cpu", discriminator=t1.discriminator)
    l2 = [float(t2.train_step(b2)["loss"]) for _ in range(n)]
    return l1, l2, t2.model_state_dict()


def test_fast_layout_and_folding_train_the_same():
    cfg = tiny_cfg(contrast="dense", preserve="l2sp", lr=0.001)  # the default stage II form
    ref1, ref2, ref_sd = _steps(_with_compute(cfg, **REFERENCE))
    got1, got2, got_sd = _steps(_with_compute(cfg, channels_last=True, fold_batchnorm=True))
    # the first step is the same forward pass (float rounding apart); later steps follow updated
    # weights, where rounding differences grow a little with every step
    assert got1[0] == pytest.approx(ref1[0], rel=1e-5) and got2[0] == pytest.approx(ref2[0], rel=1e-4)
    assert got1 == pytest.approx(ref1, rel=1e-3) and got2 == pytest.approx(ref2, rel=5e-3)
    assert ref2[-1] != ref2[0]  # F and C did move
    for k, v in ref_sd.items():
        assert got_sd[k].is_contiguous()  # saved in the usual layout
        if v.is_floating_point():
            assert float((got_sd[k] - v).norm()) <= 1e-3 * float(v.norm()) + 1e-6, k


def test_bf16_autocast_trains_close_to_fp32():
    cfg = tiny_cfg(contrast="dense", preserve="l2sp", lr=0.001)
    ref1, ref2, _ = _steps(_with_compute(cfg, precision="fp32"), n=2)
    got1, got2, sd = _steps(_with_compute(cfg, precision="bf16"), n=2)
    # bf16 keeps 8 bits of mantissa: the same forward pass to about a percent, not to float
    # rounding; after an update the difference compounds (stage II's second step: within 5 % on a
    # CPU with native bf16, 17 % on one that emulates it), so later steps only stay in range
    assert got1 == pytest.approx(ref1, rel=0.03) and got2[0] == pytest.approx(ref2[0], rel=0.03)
    assert got2 == pytest.approx(ref2, rel=0.3)
    assert got1[0] != ref1[0]  # autocast did run in bf16
    assert all(v.dtype == torch.float32 for k, v in sd.items() if v.is_floating_point())  # weights stay fp32


def test_precision_settings_are_checked():
    with pytest.raises(ConfigError, match="compute.precision"):
        load_config(None, {"compute.precision": "fp8"})
    cfg = _with_compute(tiny_cfg(), precision="fp16")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        Stage1Trainer(cfg, build_extractor(cfg), "cpu")


def test_non_finite_loss_fails_the_epoch_before_it_counts():
    cfg = tiny_cfg()
    f = build_extractor(cfg)
    pre = Preprocess(cfg.data, f.mean, f.std)
    batch = make_stage1_batch(images(2, 64), AnomalyGenerator("perlin", normal_prob=0.0), pre, np.random.default_rng(0))
    batch["image"][0, 0, 0, 0] = float("nan")
    t = Stage1Trainer(cfg, f, "cpu")
    with pytest.raises(FloatingPointError, match="non-finite loss in epoch 1"):
        t.train_epoch([batch], 0)
    assert t.epoch == 0


def test_epoch_reports_the_time_spent_waiting_for_batches():
    import time

    cfg = tiny_cfg()
    f = build_extractor(cfg)
    pre = Preprocess(cfg.data, f.mean, f.std)
    batch = make_stage1_batch(images(2, 64), AnomalyGenerator("perlin", normal_prob=0.0), pre, np.random.default_rng(0))
    t = Stage1Trainer(cfg, f, "cpu")
    fast = t.train_epoch([batch, batch], 0)

    def slow():  # a data side that takes 0.3 s per batch
        for _ in range(2):
            time.sleep(0.3)
            yield batch

    waited = t.train_epoch(slow(), 1)
    assert fast["steps"] == waited["steps"] == 2
    assert fast["data_wait_s"] < 0.1 and 0.55 <= waited["data_wait_s"] <= waited["seconds"]


def test_prefetched_keeps_order_raises_where_it_failed_and_stops_early():
    assert list(prefetched(iter(range(20)), depth=2)) == list(range(20))

    def failing():
        yield 1
        yield 2
        raise ValueError("broken image")

    got = []
    with pytest.raises(ValueError, match="broken image"):
        for item in prefetched(failing()):
            got.append(item)
    assert got == [1, 2]

    made = []

    def endless():
        i = 0
        while True:
            made.append(i)
            yield i
            i += 1

    it = prefetched(endless())
    assert next(it) == 0
    it.close()  # the consumer stops: the producer must end, not run on
    n = len(made)
    for t in threading.enumerate():
        if t.name == "batch-prefetch":
            t.join(timeout=5)
    assert len(made) <= n + 1
    assert not any(t.name == "batch-prefetch" and t.is_alive() for t in threading.enumerate())


def test_stage2_runs_activations_out_of_place_with_the_same_loss_and_gradients():
    cfg = tiny_cfg(contrast="dense", preserve="l2sp", lr=0.001)
    f = _pretrained(cfg)
    pre = Preprocess(cfg.data, f.mean, f.std)
    gen = AnomalyGenerator("perlin", normal_prob=0.0)
    d = Stage1Trainer(cfg, f, "cpu").discriminator
    t2 = Stage2Trainer(cfg, f, "cpu", discriminator=d)
    acts = [m for m in [*t2.extractor.modules(), *d.modules()] if isinstance(getattr(m, "inplace", None), bool)]
    assert acts and not any(m.inplace for m in acts)
    b2 = make_stage2_batch(images(2, 64), pre, np.random.default_rng(1), num_views=2, augment=ViewAugment(64),
                           generator=gen)
    params = [p for p in t2.extractor.parameters() if p.requires_grad]

    def loss_and_grads():
        loss = t2.losses(b2)["loss"]
        return float(loss), torch.autograd.grad(loss, params)

    got_loss, got = loss_and_grads()
    for m in acts:
        m.inplace = True
    want_loss, want = loss_and_grads()
    assert got_loss == want_loss
    assert all(torch.equal(g, w) for g, w in zip(got, want))
