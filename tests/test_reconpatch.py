"""ReConPatch: pseudo-labels, relaxed contrastive loss, adapter, training loop, resume."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tocoad_ray.config import Config, ReConPatchConfig
from tocoad_ray.models.reconpatch import (
    PatchAdapter, ReConPatch, contextual_similarity, pairwise_similarity, pseudo_labels, relaxed_contrastive_loss,
)
from tocoad_ray.train.reconpatch import CheckpointError, epoch_plan, train_reconpatch


def _clusters(n_per: int = 60, n_clusters: int = 4, d: int = 24, spread: float = 0.3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, d, generator=g) * 2.0
    x = centres.repeat_interleave(n_per, 0) + spread * torch.randn(n_clusters * n_per, d, generator=g)
    return x[torch.randperm(x.shape[0], generator=g)]


def _cfg(**rc) -> Config:
    base = dict(epochs=3, batch_size=64, lr=1e-3, proj_dim=16, max_patches=256, sigma=1.0, k=5, alpha=0.5, margin=0.5)
    base.update(rc)
    return Config(method="reconpatch", seed=3, reconpatch=ReConPatchConfig(**base))


def test_pairwise_similarity_hand_computed():
    z = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    w = pairwise_similarity(z, sigma=2.0)
    expected = torch.tensor([
        [1.0, math.exp(-1 / 2), math.exp(-4 / 2)],
        [math.exp(-1 / 2), 1.0, math.exp(-5 / 2)],
        [math.exp(-4 / 2), math.exp(-5 / 2), 1.0],
    ])
    assert torch.allclose(w, expected, atol=1e-6)


def test_contextual_similarity_hand_1d():
    z = torch.tensor([[0.0], [1.0], [3.0], [10.0], [11.5]])
    # k=2: N(i) = {i, nearest}: 0→{0,1} 1→{1,0} 2→{2,1} 3→{3,4} 4→{4,3}
    # reciprocal: R_2 = {2} (1 does not have 2 among its neighbours); query expansion over ⌈k/2⌉=1 = self only
    wc = contextual_similarity(z, k=2)
    expected = torch.tensor([
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1],
        [0, 0, 0, 1, 1],
    ], dtype=torch.float32)
    assert torch.equal(wc, expected)
    # plain k-NN sets: R_2 = {2,1}; w̃(2,1) = |{2,1}∩{1,0}|/2 = 0.5, w̃(1,2) = 0 (2 ∉ R_1) → symmetrised 0.25
    wc = contextual_similarity(z, k=2, reciprocal=False, query_expansion=False)
    expected[1, 2] = expected[2, 1] = 0.25
    assert torch.equal(wc, expected)


def test_pseudo_labels_symmetric_bounded_diagonal_one():
    z = torch.randn(100, 8, generator=torch.Generator().manual_seed(1))
    z[5] = z[6]  # duplicates must not break the self-first neighbour convention
    for alpha in (0.0, 0.3, 1.0):
        w = pseudo_labels(z, sigma=4.0, k=5, alpha=alpha)
        assert w.shape == (100, 100)
        assert torch.equal(w, w.T)
        assert w.min() >= 0 and w.max() <= 1
        assert torch.equal(torch.diagonal(w), torch.ones(100))
    assert not pseudo_labels(z.requires_grad_(), 1.0, 5, 0.5).requires_grad


def test_relaxed_loss_low_for_ideal_configuration():
    a = torch.zeros(10, 4)
    b = torch.zeros(10, 4)
    b[:, 0] = 5.0
    z = torch.cat([a, b])
    lab = torch.cat([torch.zeros(10), torch.ones(10)])
    w = (lab[:, None] == lab[None, :]).float()
    assert relaxed_contrastive_loss(z, w, margin=0.5).item() < 1e-6
    # the same points with swapped labels are far from ideal
    assert relaxed_contrastive_loss(z, 1 - w, margin=0.5).item() > 0.1


def test_relaxed_loss_gradient_pulls_similar_pairs_together():
    z0 = torch.randn(12, 3, generator=torch.Generator().manual_seed(2))
    w = torch.eye(12)
    w[0, 1] = w[1, 0] = 1.0
    z = z0.clone().requires_grad_(True)
    relaxed_contrastive_loss(z, w, margin=0.5).backward()
    assert torch.isfinite(z.grad).all()
    z1 = z0 - 0.05 * z.grad
    before = (z0[0] - z0[1]).norm() / torch.cdist(z0, z0)[0].mean()
    after = (z1[0] - z1[1]).norm() / torch.cdist(z1, z1)[0].mean()
    assert after < before


def test_identity_init_and_adapter_roundtrip(tmp_path):
    x = torch.randn(7, 20)
    m = ReConPatch(20, proj_dim=8)
    assert torch.equal(m.forward_features(x), x)
    assert m(x).shape == (7, 8)
    a = m.adapter()
    assert torch.equal(a(x), x)
    maps = torch.randn(2, 20, 3, 4)
    assert torch.equal(a(maps), maps)
    assert torch.equal(PatchAdapter(20, 20)(x), x)
    with torch.no_grad():
        a.representation.weight.mul_(2.0)
    a.save(tmp_path / "g.safetensors")
    b = PatchAdapter.load(tmp_path / "g.safetensors")
    assert torch.equal(b(x), 2 * x)
    assert PatchAdapter(20, 12)(x).shape == (7, 12)


def test_epoch_plan_depends_on_seed_and_epoch_only():
    p1, bs, steps = epoch_plan(1000, 64, 300, seed=1, epoch=2)
    assert (bs, steps) == (64, 4) and p1.shape == (256,) and p1.unique().numel() == 256
    assert torch.equal(p1, epoch_plan(1000, 64, 300, seed=1, epoch=2)[0])
    assert not torch.equal(p1, epoch_plan(1000, 64, 300, seed=1, epoch=3)[0])


def test_training_reduces_loss_and_ema_tracks(tmp_path):
    x = _clusters()
    cfg = _cfg(epochs=4)
    adapter = train_reconpatch(cfg, x, tmp_path, device="cpu", progress=False, log=None)
    recs = [json.loads(l) for l in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2, 3, 4]
    assert recs[-1]["loss"] < recs[0]["loss"]
    assert all(0 <= r["mean_w"] <= 1 and r["seconds"] >= 0 for r in recs)
    assert not torch.equal(adapter(x), x)  # g has moved away from identity
    assert torch.equal(PatchAdapter.load(tmp_path / "reconpatch" / "adapter.safetensors")(x), adapter(x))


def test_ema_moves_toward_online_after_one_step(tmp_path):
    from safetensors.torch import load_file

    x = _clusters()
    cfg = _cfg(epochs=1, max_patches=64)  # exactly one step
    train_reconpatch(cfg, x, tmp_path, device="cpu", progress=False, log=None)
    ck = tmp_path / "reconpatch"
    online = load_file(str(ck / "epoch_0001.model.safetensors"))
    ema = load_file(str(ck / "epoch_0001.ema.safetensors"))
    torch.manual_seed(cfg.seed)
    init = ReConPatch(x.shape[1], None, cfg.reconpatch.proj_dim).state_dict()
    decay = cfg.reconpatch.ema_decay
    for k in online:
        assert not torch.equal(online[k], ema[k]) or torch.equal(online[k], init[k])
        assert torch.allclose(ema[k], decay * init[k] + (1 - decay) * online[k], atol=1e-6)
        assert (ema[k] - online[k]).norm() <= (init[k] - online[k]).norm() + 1e-7


def test_seeded_bitwise_and_resume_equals_straight_run(tmp_path):
    x = _clusters()
    cfg = _cfg(epochs=3)
    straight = train_reconpatch(cfg, x, tmp_path / "a", device="cpu", progress=False, log=None)
    again = train_reconpatch(cfg, x, tmp_path / "b", device="cpu", progress=False, log=None)
    assert torch.equal(straight.representation.weight, again.representation.weight)

    first = _cfg(epochs=2)
    train_reconpatch(first, x, tmp_path / "c", device="cpu", progress=False, log=None)
    resumed = train_reconpatch(cfg, x, tmp_path / "c", device="cpu", resume=True, progress=False, log=None)
    assert torch.equal(straight.representation.weight, resumed.representation.weight)
    assert torch.equal(straight.representation.bias, resumed.representation.bias)
    epochs = [json.loads(l)["epoch"] for l in (tmp_path / "c" / "train_log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    meta = json.loads((tmp_path / "c" / "reconpatch" / "latest.json").read_text())
    assert meta["epoch"] == 3
    assert len(list((tmp_path / "c" / "reconpatch").glob("epoch_*.model.safetensors"))) == 2

    # a corrupted checkpoint is refused, not silently used
    (tmp_path / "c" / "reconpatch" / meta["files"]["optim"]["name"]).write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        train_reconpatch(cfg, x, tmp_path / "c", device="cpu", resume=True, progress=False, log=None)
