"""ToCoAD two-stage training: losses, D/C shapes, stage steps, gradients, checkpoints/resume."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn

from tocoad_ray.config import Config, replace
from tocoad_ray.data import Preprocess
from tocoad_ray.models.backbone import FeatureExtractor
from tocoad_ray.models.contrastive import ContrastiveHead
from tocoad_ray.models.discriminator import Discriminator
from tocoad_ray.synth import AnomalyGenerator
from tocoad_ray.train import (CheckpointError, Stage1Trainer, Stage2Trainer, ViewAugment, build_extractor, ce_loss,
                              focal_loss, make_stage1_batch, make_stage2_batch, neg_cosine, sym_loss, train_tocoad)
from tocoad_ray.train import stage2 as stage2_mod


PAPER_STAGE2 = dict(lr=0.01, contrast="global", preserve="none", crop_scale_min=0.2)


def tiny_cfg(size: int = 64, epochs: int = 2, **stage2) -> Config:
    """The paper's stage II form unless ``stage2`` says otherwise (the library default is anchored)."""
    stage2 = {**PAPER_STAGE2, **stage2}
    cfg = Config(method="tocoad", seed=3)
    cfg.data = replace(cfg.data, image_size=size, crop_size=size)
    cfg.backbone = replace(cfg.backbone, weights="random")
    cfg.stage1 = replace(cfg.stage1, epochs=epochs, batch_size=2, max_steps_per_epoch=1)
    cfg.stage2 = replace(cfg.stage2, epochs=epochs, batch_size=2, max_steps_per_epoch=1, proj_dim=32, pred_hidden=8, **stage2)
    return cfg


def images(n: int = 4, size: int = 72, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.integers(60, 200, size=(size // 8, size // 8, 3)).astype(np.uint8)
        out.append(np.kron(base, np.ones((8, 8, 1), dtype=np.uint8)))
    return out


# --- losses ---------------------------------------------------------------------------------------
def test_neg_cosine_and_sym_loss_hand_cases():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert neg_cosine(p, p.clone()).item() == pytest.approx(-1.0)
    assert neg_cosine(p, torch.tensor([[0.0, 3.0], [5.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-7)
    assert neg_cosine(p, -p).item() == pytest.approx(1.0)
    # M = 2: ½D(p1, z2) + ½D(p2, z1)
    p1, p2, z1, z2 = (torch.randn(4, 8) for _ in range(4))
    want = 0.5 * neg_cosine(p1, z2) + 0.5 * neg_cosine(p2, z1)
    assert sym_loss([p1, p2], [z1, z2]).item() == pytest.approx(want.item(), abs=1e-6)
    # M = 3: mean over the 3 pairs
    ps, zs = [torch.randn(4, 8) for _ in range(3)], [torch.randn(4, 8) for _ in range(3)]
    pairs = [(0, 1), (0, 2), (1, 2)]
    want = sum(0.5 * neg_cosine(ps[i], zs[j]) + 0.5 * neg_cosine(ps[j], zs[i]) for i, j in pairs) / 3
    assert sym_loss(ps, zs).item() == pytest.approx(want.item(), abs=1e-6)
    assert sym_loss([p1, p1], [p1, p1]).item() == pytest.approx(-1.0)


def test_stop_gradient_on_z():
    p = torch.randn(3, 5, requires_grad=True)
    z = torch.randn(3, 5, requires_grad=True)
    neg_cosine(p, z).backward()
    assert p.grad is not None and z.grad is None


def test_focal_loss_known_numbers():
    # one pixel, logits (0, 0) → p = 0.5 for both classes
    logits = torch.zeros(1, 2, 1, 1)
    anomalous, normal = torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)
    ln2 = math.log(2.0)
    assert focal_loss(logits, anomalous, gamma=2, alpha=0.25).item() == pytest.approx(0.25 * 0.25 * ln2)
    assert focal_loss(logits, normal, gamma=2, alpha=0.25).item() == pytest.approx(0.75 * 0.25 * ln2)
    # p_t = 0.9 (logit difference ln 9)
    l9 = torch.tensor([0.0, math.log(9.0)]).view(1, 2, 1, 1)
    assert focal_loss(l9, anomalous, gamma=2, alpha=0.25).item() == pytest.approx(0.25 * 0.01 * -math.log(0.9), rel=1e-5)
    # γ = 0 → α-weighted CE; α = None, γ = 0 → CE
    x = torch.randn(2, 2, 5, 5)
    m = (torch.rand(2, 1, 5, 5) > 0.5).float()
    ce_px = Fn.cross_entropy(x, m[:, 0].long(), reduction="none")
    w = torch.where(m[:, 0] > 0, 0.25, 0.75)
    assert focal_loss(x, m, gamma=0, alpha=0.25).item() == pytest.approx((w * ce_px).mean().item(), rel=1e-5)
    assert focal_loss(x, m, gamma=0, alpha=None).item() == pytest.approx(ce_loss(x, m).item(), rel=1e-5)
    assert focal_loss(x, m, gamma=2).item() < focal_loss(x, m, gamma=0).item()


# --- models ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lite0_random():
    return build_extractor(tiny_cfg())


@pytest.mark.parametrize("size", [64, 96])
def test_discriminator_output_matches_input_size(lite0_random, size):
    assert lite0_random.layers == ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"]
    d = Discriminator(lite0_random.channels, lite0_random.reductions).eval()
    with torch.no_grad():
        out = d(lite0_random(torch.randn(2, 3, size, size)))
    assert out.shape == (2, 2, size, size)


def test_discriminator_builds_for_wide_resnet_channels():
    ch = {"act1": 64, "layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
    red = {"act1": 2, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
    d = Discriminator(ch, red).eval()
    feats = {l: torch.randn(1, c, 64 // r, 64 // r) for (l, c), r in zip(ch.items(), red.values())}
    assert d(feats).shape == (1, 2, 64, 64)


def test_contrastive_head_shapes():
    c = ContrastiveHead({"blocks.4": 112, "blocks.6": 320}, proj_dim=32, pred_hidden=8)
    assert isinstance(c.adapters["blocks_6"], torch.nn.Identity)
    zs, ps = c({"blocks.4": torch.randn(3, 112, 4, 4), "blocks.6": torch.randn(3, 320, 2, 2)})
    assert all(z.shape == (3, 32) for z in zs.values()) and all(p.shape == (3, 32) for p in ps.values())
    assert isinstance(ContrastiveHead({"a": 8}, proj_dim=16, pred_hidden=0).predictor, torch.nn.Linear)


# --- stage steps ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lite0_pretrained():
    cfg = tiny_cfg()
    cfg.backbone = replace(cfg.backbone, weights="pretrained")
    try:
        return build_extractor(cfg)
    except Exception as e:  # pragma: no cover - offline weights absent
        pytest.skip(f"pretrained lite0 unavailable: {e}")


def test_stage1_steps_lower_loss_on_fixed_batch(lite0_pretrained):
    cfg = tiny_cfg()
    cfg.stage1 = replace(cfg.stage1, lr=1e-3)
    pre = Preprocess(cfg.data, lite0_pretrained.mean, lite0_pretrained.std)
    gen = AnomalyGenerator("perlin", normal_prob=0.0)
    batch = make_stage1_batch(images(2, 64), gen, pre, np.random.default_rng(0))
    assert batch["image"].shape == (2, 3, 64, 64) and batch["mask"].shape == (2, 1, 64, 64)
    assert batch["mask"].sum() > 0
    t = Stage1Trainer(cfg, lite0_pretrained, "cpu")
    before = {k: v.clone() for k, v in lite0_pretrained.state_dict().items()}
    losses = [t.train_step(batch)["loss"] for _ in range(12)]
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(torch.equal(v, lite0_pretrained.state_dict()[k]) for k, v in before.items())  # F frozen


def _stage2_setup(extractor, **stage2):
    cfg = tiny_cfg(**stage2)
    pre = Preprocess(cfg.data, extractor.mean, extractor.std)
    gen = AnomalyGenerator("perlin", normal_prob=0.0)
    d = Discriminator(extractor.channels, extractor.reductions)
    batch = make_stage2_batch(images(2, 64), pre, np.random.default_rng(1), num_views=2, augment=ViewAugment(64), generator=gen)
    return cfg, d, batch


def test_stage2_gradients_reach_F_not_D(lite0_random):
    cfg, d, batch = _stage2_setup(lite0_random)
    assert len(batch["views"]) == 2 and batch["views"][0].shape == (2, 3, 64, 64) and batch["image"].shape == (2, 3, 64, 64)
    t = Stage2Trainer(cfg, lite0_random, "cpu", discriminator=d)
    d_before = {k: v.clone() for k, v in d.state_dict().items()}
    f_before = {k: v.clone() for k, v in lite0_random.body.named_parameters()}
    out = t.losses(batch)
    assert set(out) >= {"loss", "loss_sym", "loss_neg"}
    # gradient of the negative term alone flows through D into F
    out["loss_neg"].backward()
    assert all(p.grad is None for p in d.parameters())
    assert sum(float(p.grad.abs().sum()) for p in lite0_random.body.parameters() if p.grad is not None) > 0
    t.optimizer.zero_grad(set_to_none=True)
    m = t.train_step(batch)
    assert math.isfinite(m["loss"]) and m["proj_std"] > 0
    assert all(torch.equal(v, d.state_dict()[k]) for k, v in d_before.items())  # D frozen, BN stats included
    assert any(not torch.equal(v, dict(lite0_random.body.named_parameters())[k]) for k, v in f_before.items())
    bn = next(m for m in lite0_random.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not bn.training  # F's BN statistics frozen


def test_stage2_byol_target_step(lite0_random):
    cfg, d, batch = _stage2_setup(lite0_random, target="byol")
    t = Stage2Trainer(cfg, lite0_random, "cpu", discriminator=d)
    tp = {k: v.clone() for k, v in t.target_head.state_dict().items()}
    m = t.train_step(batch)
    assert math.isfinite(m["loss"])
    assert any(not torch.equal(v, t.target_head.state_dict()[k]) for k, v in tp.items())  # EMA moved
    assert all(not p.requires_grad for p in t.target_extractor.parameters())
    assert any(k.startswith("TF.") for k in t.state_dict()["model"])


def test_stage2_without_D_uses_L_sym_only(lite0_random):
    cfg = tiny_cfg()
    pre = Preprocess(cfg.data, lite0_random.mean, lite0_random.std)
    batch = make_stage2_batch(images(2, 64), pre, np.random.default_rng(2))
    assert "image" not in batch
    out = Stage2Trainer(cfg, lite0_random, "cpu").losses(batch)
    assert "loss_neg" not in out and out["loss"] is out["loss_sym"]


# --- full runs, resume, checkpoints ----------------------------------------------------------------
def interrupt_stage2_then_resume(run, workdir, monkeypatch):
    """``run(resume)`` is killed (KeyboardInterrupt) after stage II's first epoch, then resumed;
    returns the resumed run's weights."""
    calls = {"n": 0}
    original = stage2_mod.Stage2Trainer.train_epoch

    def crash(self, batches, epoch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, batches, epoch)

    monkeypatch.setattr(stage2_mod.Stage2Trainer, "train_epoch", crash)
    with pytest.raises(KeyboardInterrupt):
        run(False)
    monkeypatch.setattr(stage2_mod.Stage2Trainer, "train_epoch", original)
    assert json.loads((workdir / "stage2" / "latest.json").read_text())["epoch"] == 1
    return run(True)


def _run(cfg, workdir, resume=False):
    return train_tocoad(cfg, images(4, 72), workdir, device="cpu", resume=resume, progress=False, log=lambda s: None)


def test_resume_matches_straight_run_and_weights_reload(tmp_path, monkeypatch):
    cfg = tiny_cfg(epochs=2)
    straight = _run(cfg, tmp_path / "a")
    lines = [json.loads(l) for l in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert [(l["stage"], l["epoch"]) for l in lines] == [("stage1", 1), ("stage1", 2), ("stage2", 1), ("stage2", 2)]
    assert "proj_std" in lines[-1] and "loss_neg" in lines[-1]["losses"]

    # interrupted after stage II's first epoch, then resumed: identical final weights
    resumed = interrupt_stage2_then_resume(lambda resume: _run(cfg, tmp_path / "b", resume=resume), tmp_path / "b", monkeypatch)
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    stages = [json.loads(l)["stage"] for l in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert stages == ["stage1", "stage1", "stage2", "stage2"]  # stage I skipped on resume

    # extending a finished 1-epoch run to 2 epochs reaches the same weights
    short = replace(cfg, stage1=replace(cfg.stage1, epochs=1), stage2=replace(cfg.stage2, epochs=1))
    _run(short, tmp_path / "c")
    extended = _run(cfg, tmp_path / "c", resume=True)
    assert all(torch.allclose(extended[k].float(), straight[k].float(), atol=1e-6) for k in straight)

    # the returned body reloads by name into the pipeline's extractor (cfg.backbone.layers only)
    from safetensors.torch import save_file
    path = tmp_path / "f.safetensors"
    save_file(straight, str(path))
    f = FeatureExtractor(cfg.backbone.name, cfg.backbone.layers, weights=str(path)).eval()
    full = FeatureExtractor(cfg.backbone.name, ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"], weights="random")
    full.body.load_state_dict(straight)
    full.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = f(x), full(x)
    assert all(torch.equal(a[l], b[l]) for l in cfg.backbone.layers)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    cfg = tiny_cfg(epochs=1)
    cfg.stage2 = replace(cfg.stage2, enabled=False)
    _run(cfg, tmp_path)
    sdir = tmp_path / "stage1"
    model = next(sdir.glob("model_e*.safetensors"))
    data = bytearray(model.read_bytes())
    data[-5] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        _run(cfg, tmp_path, resume=True)
    (sdir / "latest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupted"):
        _run(cfg, tmp_path, resume=True)
    _run(cfg, tmp_path, resume=False)  # a fresh start overwrites it


def test_resume_with_changed_config_is_refused(tmp_path):
    cfg = tiny_cfg(epochs=1)
    cfg.stage2 = replace(cfg.stage2, enabled=False)
    _run(cfg, tmp_path)
    other = replace(cfg, stage1=replace(cfg.stage1, lr=5e-4))
    with pytest.raises(CheckpointError, match="different configuration"):
        _run(other, tmp_path, resume=True)


@pytest.mark.parametrize("name, layer", [("tf_efficientnet_lite0", "blocks.2"), ("wide_resnet50_2", "layer2")])
def test_normalisation_without_a_model_is_the_extractors(name, layer):
    from tocoad_ray.models.backbone import normalisation

    f = FeatureExtractor(name, [layer], weights="random")
    assert normalisation(name) == (f.mean, f.std)
