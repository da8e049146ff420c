"""Stage II variants: dense pairing through crop boxes, the preservation term, resume."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from torchvision.transforms.v2 import functional as TF

from tocoad_ray.config import ConfigError, build_config, replace
from tocoad_ray.data import Preprocess
from tocoad_ray.models.discriminator import Discriminator
from tocoad_ray.synth import AnomalyGenerator
from tocoad_ray.train import (
    Stage2Trainer,
    ViewAugment,
    build_extractor,
    make_stage2_batch,
    train_tocoad,
)
from tocoad_ray.train.losses import correspondence, dense_neg_cosine, dense_sym_loss

from .test_tocoad_train import images, interrupt_stage2_then_resume, tiny_cfg


# --- dense pairing ---------------------------------------------------------------------------------
def test_correspondence_for_known_boxes():
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    quadrant = torch.tensor([[0.5, 0.5, 0.5, 0.5]])  # bottom-right quarter of the image
    grid, valid = correspondence(full, quadrant, 4, 4)
    # cells (y, x) >= 2 of the full view lie in the quadrant, the rest do not
    want = torch.zeros(4, 4, dtype=torch.bool)
    want[2:, 2:] = True
    assert torch.equal(valid[0], want)
    # full-view cell (2, 3): centre (0.625, 0.875) of the image → (0.25, 0.75) of the quadrant view
    assert grid[0, 2, 3].tolist() == pytest.approx([2 * 0.75 - 1, 2 * 0.25 - 1])
    # the other way: every quadrant cell lies in the full view, at half its own coordinates + ½
    grid, valid = correspondence(quadrant, full, 4, 4)
    assert bool(valid.all())
    assert grid[0, 0, 0].tolist() == pytest.approx([2 * (0.5 + 0.5 * 0.125) - 1] * 2)
    # disjoint crops: nothing corresponds
    _, valid = correspondence(torch.tensor([[0.0, 0.0, 0.4, 0.4]]), torch.tensor([[0.6, 0.6, 0.4, 0.4]]), 4, 4)
    assert not bool(valid.any())


def _coordinate_map(box: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """A 2-channel "feature map" whose cell holds the image point its centre sees: [B, 2, h, w]."""
    cy = (torch.arange(h) + 0.5) / h
    cx = (torch.arange(w) + 0.5) / w
    y = box[:, 0, None, None] + box[:, 2, None, None] * cy[None, :, None]
    x = box[:, 1, None, None] + box[:, 3, None, None] * cx[None, None, :]
    return torch.stack(torch.broadcast_tensors(y, x), dim=1)


def test_paired_cells_see_the_same_image_point():
    """Reading view b's map at the correspondence grid gives view a's image point at every valid cell."""
    box_a = torch.tensor([[0.1, 0.2, 0.6, 0.5], [0.0, 0.0, 1.0, 1.0]])
    box_b = torch.tensor([[0.3, 0.1, 0.5, 0.7], [0.25, 0.25, 0.5, 0.5]])
    h = w = 8
    grid, valid = correspondence(box_a, box_b, h, w)
    read = Fn.grid_sample(_coordinate_map(box_b, h, w), grid, mode="bilinear", padding_mode="border", align_corners=False)
    want = _coordinate_map(box_a, h, w)
    assert valid.any(dim=(1, 2)).all()
    assert torch.allclose(read.permute(0, 2, 3, 1)[valid], want.permute(0, 2, 3, 1)[valid], atol=1e-5)
    # identical maps at corresponding points → D(p, z) = −1 on the overlap
    assert dense_neg_cosine(want + 1.0, _coordinate_map(box_b, h, w) + 1.0, box_a, box_b).item() == pytest.approx(-1.0, abs=1e-5)


def test_views_are_seeded_by_their_seed_alone_and_leave_the_global_rng_alone():
    """The same seed gives the same view (whatever the global RNG holds), a different seed another,
    the global torch RNG is where it was, and the draws are those of torch.manual_seed(seed)."""
    from torchvision.transforms import v2

    x = torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(0))
    aug = ViewAugment(32)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a, box_a = aug.sample(x, 7)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    b, box_b = aug.sample(x, 7)
    assert torch.equal(a, b) and torch.equal(box_a, box_b)
    assert not torch.equal(a, aug.sample(x, 8)[0])
    with torch.random.fork_rng(devices=[]):  # the reference: the transforms after torch.manual_seed
        torch.manual_seed(7)
        p = aug.crop.make_params([x])
        ref = aug.colour(TF.resized_crop(x, p["top"], p["left"], p["height"], p["width"], [32, 32], antialias=True))
    assert torch.equal(a, ref.clamp(0.0, 1.0)) and isinstance(aug.crop, v2.RandomResizedCrop)


def test_views_leave_the_accelerator_generators_alone():
    """Making a view seeds the CPU generator only: no seed reaches CUDA's generator, neither at
    once (CUDA initialised) nor queued for when it starts (torch.manual_seed queues one, with a
    formatted stack, on every call)."""
    x = torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(0))
    aug = ViewAugment(32)
    if torch.cuda.is_initialized():
        before = torch.cuda.initial_seed()
        for seed in (11, 12):
            aug.sample(x, seed)
        assert torch.cuda.initial_seed() == before
        return

    def queued():  # the calls waiting for CUDA to start (held here, so compared by identity)
        tracker = getattr(torch.cuda, "_lazy_seed_tracker", None)
        calls = list(tracker.get_calls()) if tracker is not None else []
        return calls + list(getattr(torch.cuda, "_queued_calls", []))

    def same(a, b):
        return len(a) == len(b) and all(x is y for x, y in zip(a, b))

    start = queued()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)  # the call views used to make: it queues a seed for CUDA
    assert not same(queued(), start)
    start = queued()
    for seed in (11, 12):
        aug.sample(x, seed)
    assert same(queued(), start)


def test_view_boxes_are_the_crops_taken():
    """ViewAugment.sample's box is the crop of the input the view shows (colour off: a grey image is
    unchanged by RandomGrayscale up to its weights summing to 0.9999, jitter 0)."""
    rng = np.random.default_rng(0)
    grey = torch.from_numpy(rng.random((1, 48, 64), dtype=np.float32)).repeat(3, 1, 1)
    aug = ViewAugment(32, scale=(0.2, 1.0), jitter=0.0)
    for seed in range(5):
        view, box = aug.sample(grey, seed)
        t, l, h, w = (round(float(v) * s) for v, s in zip(box, (48, 64, 48, 64)))
        assert torch.allclose(view, TF.resized_crop(grey, t, l, h, w, [32, 32], antialias=True).clamp(0, 1), atol=1e-3)
    # the rows carry the boxes, one per view
    cfg = tiny_cfg()
    pre = Preprocess(cfg.data, (0.5,) * 3, (0.5,) * 3)
    batch = make_stage2_batch(images(3, 64), pre, np.random.default_rng(1), num_views=2)
    assert len(batch["boxes"]) == 2 and batch["boxes"][0].shape == (3, 4)
    assert bool((batch["boxes"][0][:, 2:] > 0).all() and (batch["boxes"][0][:, :2] + batch["boxes"][0][:, 2:] <= 1 + 1e-6).all())


def test_dense_sym_loss_matches_pairs_and_gradients_reach_F():
    ps = [torch.randn(2, 8, 4, 4) for _ in range(2)]
    zs = [torch.randn(2, 8, 4, 4) for _ in range(2)]
    bs = [torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2), torch.tensor([[0.2, 0.1, 0.7, 0.8]] * 2)]
    want = 0.5 * dense_neg_cosine(ps[0], zs[1], bs[0], bs[1]) + 0.5 * dense_neg_cosine(ps[1], zs[0], bs[1], bs[0])
    assert dense_sym_loss(ps, zs, bs).item() == pytest.approx(want.item(), abs=1e-6)

    cfg = tiny_cfg(contrast="dense")
    lite0_random = build_extractor(cfg)
    pre = Preprocess(cfg.data, lite0_random.mean, lite0_random.std)
    gen = AnomalyGenerator("perlin", normal_prob=0.0)
    d = Discriminator(lite0_random.channels, lite0_random.reductions)
    batch = make_stage2_batch(images(2, 64), pre, np.random.default_rng(1), num_views=2, generator=gen)
    t = Stage2Trainer(cfg, lite0_random, "cpu", discriminator=d)
    out = t.losses(batch)
    out["loss_sym"].backward()
    assert sum(float(p.grad.abs().sum()) for p in lite0_random.body.parameters() if p.grad is not None) > 0
    t.optimizer.zero_grad(set_to_none=True)
    m = t.train_step(batch)
    assert {"loss", "loss_sym", "loss_neg"} <= set(m) and all(f"sym/{l}" in m for l in cfg.backbone.stage2_layers)
    with pytest.raises(ValueError, match="crop boxes"):
        t.losses({k: v for k, v in batch.items() if k != "boxes"})


# --- preservation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["feature", "l2sp"])
def test_preservation_is_zero_at_init_and_grows_as_F_moves(kind):
    cfg = tiny_cfg(preserve=kind, preserve_weight=0.0, lr=0.05)  # β = 0: measure the term, do not pull back
    extractor = build_extractor(cfg)
    pre = Preprocess(cfg.data, extractor.mean, extractor.std)
    batch = make_stage2_batch(images(2, 64), pre, np.random.default_rng(4), num_views=2)
    t = Stage2Trainer(cfg, extractor, "cpu")
    assert t.losses(batch)["loss_pres"].item() == 0.0
    seen, moved = [], []
    w0 = [p.detach().clone() for p in extractor.parameters()]
    for _ in range(4):
        m = t.train_step(batch)
        seen.append(t.losses(batch)["loss_pres"].item())
        moved.append(sum(float((p.detach() - q).pow(2).sum()) for p, q in zip(extractor.parameters(), w0)))
    assert seen[0] > 0 and seen[-1] > seen[0]
    assert moved[-1] > moved[0] > 0
    assert m["loss_pres"] >= 0
    # β > 0 adds β·L_pres to the loss
    t2 = Stage2Trainer(replace(cfg, stage2=replace(cfg.stage2, preserve_weight=2.0)), extractor, "cpu")
    t2.anchor_extractor, t2.anchor_weights = t.anchor_extractor, t.anchor_weights
    out = t2.losses(batch)
    assert out["loss"].item() == pytest.approx(out["loss_sym"].item() + 2.0 * out["loss_pres"].item(), rel=1e-5)


def test_l2sp_moves_F_decay_into_the_anchor():
    cfg = tiny_cfg(preserve="l2sp")
    t = Stage2Trainer(cfg, build_extractor(cfg), "cpu")
    assert [g["weight_decay"] for g in t.optimizer.param_groups] == [0.0, cfg.stage2.weight_decay]


@pytest.mark.parametrize("bad", [{"stage2": {"contrast": "pixel"}}, {"stage2": {"preserve": "ewc"}},
                                 {"stage2": {"preserve_weight": -1}}, {"stage2": {"crop_scale_min": 0}},
                                 {"stage2": {"color_jitter": 1.5}}])
def test_bad_variant_settings_are_named(bad):
    key = next(iter(bad["stage2"]))
    with pytest.raises(ConfigError, match=f"stage2.{key}"):
        build_config(bad)


# --- partial fine-tuning -----------------------------------------------------------------------------
def test_trainable_from_freezes_the_earlier_layers_and_keeps_the_later_gradients():
    """stage2.trainable_from=blocks.2: the stem, blocks.0 and blocks.1 get no gradient and never move;
    every other parameter gets exactly the gradient it gets when all of F trains (same forward, same
    loss: freezing earlier layers only cuts the backward pass short)."""
    f0 = build_extractor(tiny_cfg())
    d0 = Discriminator(f0.channels, f0.reductions)

    def trainer(**stage2):  # the same F0 and D for both
        cfg = tiny_cfg(contrast="dense", preserve="l2sp", **stage2)
        f = copy.deepcopy(f0)
        return cfg, f, Stage2Trainer(cfg, f, "cpu", discriminator=copy.deepcopy(d0))

    cfg, f_all, full = trainer()
    _, f_part, part = trainer(trainable_from="blocks.2")
    pre = Preprocess(cfg.data, f_all.mean, f_all.std)
    batch = make_stage2_batch(images(2, 64), pre, np.random.default_rng(5), num_views=2,
                              generator=AnomalyGenerator("perlin", normal_prob=0.0))
    frozen = set(f_part.parameters_before("blocks.2"))
    assert frozen and all(n.startswith(("body.conv_stem", "body.bn1", "body.blocks.0.", "body.blocks.1.")) for n in frozen)
    assert any(n.startswith("body.blocks.1.") for n in frozen)
    for t in (full, part):
        t.optimizer.zero_grad(set_to_none=True)
        out = t.losses(batch)
        out["loss"].backward()
    assert full.losses(batch)["loss"].item() == pytest.approx(part.losses(batch)["loss"].item(), rel=1e-6)
    grads_all, grads_part = dict(f_all.named_parameters()), dict(f_part.named_parameters())
    checked = 0
    for n, p in grads_part.items():
        if n in frozen:
            assert not p.requires_grad and p.grad is None, n
        elif p.grad is not None:
            torch.testing.assert_close(p.grad, grads_all[n].grad, rtol=1e-4, atol=1e-7)
            checked += 1
    assert checked > 20
    assert any(grads_all[n].grad is not None and grads_all[n].grad.abs().sum() > 0 for n in frozen)  # full F: they train

    start = {n: p.detach().clone() for n, p in f_part.named_parameters()}
    part.optimizer.zero_grad(set_to_none=True)
    for _ in range(2):
        part.train_step(batch)
    now = dict(f_part.named_parameters())
    assert all(torch.equal(now[n].detach(), start[n]) for n in frozen)
    assert any(not torch.equal(now[n].detach(), start[n]) for n in start if n not in frozen)


def test_trainable_from_names_a_missing_layer(tmp_path):
    cfg = tiny_cfg(trainable_from="blocks.9")
    with pytest.raises(ValueError, match=r"stage2.trainable_from: .*no feature layer 'blocks.9'.*blocks.2"):
        build_extractor(cfg)
    with pytest.raises(ValueError, match=r"no layer 'blocks.9'.*blocks.2"):  # an extractor built elsewhere
        Stage2Trainer(cfg, build_extractor(tiny_cfg()), "cpu")
    with pytest.raises(ConfigError, match="stage2.trainable_from"):
        build_config({"stage2": {"trainable_from": 3}})
    # train-all refuses it before anything starts (no Ray, no output folder)
    from jobs.train_all import run

    with pytest.raises(ConfigError, match="stage2.trainable_from.*'blocks.9'"):
        run(cfg, str(tmp_path / "data"), ["bottle"], tmp_path / "out", echo=lambda m: None)
    assert not (tmp_path / "out").exists()


# --- resume ------------------------------------------------------------------------------------------
VARIANTS = [dict(contrast="dense"), dict(preserve="feature", preserve_weight=0.5), dict(preserve="l2sp", preserve_weight=0.1),
            dict(contrast="dense", preserve="feature", crop_scale_min=0.5, color_jitter=0.2)]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "+".join(f"{k}={v[k]}" for k in v))
def test_every_variant_resumes_from_its_checkpoint(tmp_path, monkeypatch, variant):
    cfg = tiny_cfg(epochs=2, **variant)
    run = lambda wd, resume=False: train_tocoad(cfg, images(4, 72), wd, device="cpu", resume=resume,  # noqa: E731
                                                progress=False, log=lambda s: None)
    straight = run(tmp_path / "a")
    resumed = interrupt_stage2_then_resume(lambda resume: run(tmp_path / "b", resume), tmp_path / "b", monkeypatch)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    # F moved away from where training started (the seeded F the run began with, not a fresh random one)
    from tocoad_ray.train.seeding import seeded_init

    start = seeded_init(cfg.seed, 0, lambda: build_extractor(cfg)).body.state_dict()
    assert straight.keys() == start.keys()
    assert any(not torch.equal(straight[k], start[k]) for k in straight)
