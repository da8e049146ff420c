"""Ray Data pipelines: the training rows and bank features the Ray path feeds are exactly the
single-process ones, every epoch sees new samples, a fixed seed reproduces them, and no feature
row is lost or duplicated whatever the number of actors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tocoad_ray.data import Preprocess, load_split
from tocoad_ray.distributed.features import extract_features
from tocoad_ray.distributed.samples import (
    SampleSpec,
    configure_data_context,
    decode_images,
    epoch_dataset,
    image_store,
    to_trainer_batch,
)
from tocoad_ray.models.backbone import FeatureExtractor
from tocoad_ray.patch_model import PatchModel
from tocoad_ray.pipeline import _loader, extract
from tocoad_ray.synth import AnomalyGenerator
from tocoad_ray.train.images import prepare_images
from tocoad_ray.train.schedule import iter_batches
from tocoad_ray.train.stage1 import make_stage1_batch
from tocoad_ray.train.stage2 import make_stage2_batch
from tocoad_ray.train.views import view_augment

from .ray_fixtures import ray_local, tiny_cfg, tiny_root  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def setup(ray_local, tiny_root):  # noqa: F811
    cfg = tiny_cfg(**{"stage1.batch_size": 4, "stage1.max_steps_per_epoch": 1, "stage2.max_steps_per_epoch": 1})
    paths = [s.path for s in load_split(tiny_root, "bottle", "mvtec").train]
    ex = FeatureExtractor(cfg.backbone.name, cfg.backbone.layers, cfg.backbone.weights)
    configure_data_context()
    store = image_store(decode_images(paths, cfg, ex.mean, ex.std), len(paths))
    return {"cfg": cfg, "paths": paths, "mean": ex.mean, "std": ex.std, "store": store, "root": tiny_root}


def _ray_batches(s, stage, epoch, world=1, rank=0, with_generator=True, epochs=1):
    spec = SampleSpec.build(s["cfg"], stage, s["mean"], s["std"], with_generator)
    ds = epoch_dataset(s["store"], len(s["paths"]), spec, epoch, rank, world, epochs=epochs)
    bw = 4 // world
    return [to_trainer_batch(b) for b in ds.iter_torch_batches(batch_size=bw)]


def _reference(s, stage, epoch):
    cfg = s["cfg"]
    pre = Preprocess(cfg.data, s["mean"], s["std"])
    imgs = prepare_images(s["paths"], pre)
    g = cfg.generator
    gen = AnomalyGenerator(g.kind, texture_dir=g.texture_dir, normal_prob=g.normal_prob, rotate=g.rotate)
    sc = cfg.stage1 if stage == 1 else cfg.stage2
    if stage == 1:
        make = lambda ims, rngs: make_stage1_batch(ims, gen, pre, rngs)  # noqa: E731
    else:
        aug = view_augment(cfg, pre.size)
        make = lambda ims, rngs: make_stage2_batch(ims, pre, rngs, cfg.stage2.num_views, aug, gen)  # noqa: E731
    return list(iter_batches(imgs, sc.batch_size, sc.max_steps_per_epoch, cfg.seed, stage, epoch, make))


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        xs, ys = (a[k], b[k]) if k in ("views", "boxes") else ([a[k]], [b[k]])
        for x, y in zip(xs, ys):
            assert torch.equal(x, y), f"{k} differs"


@pytest.mark.parametrize("stage", [1, 2])
def test_ray_rows_equal_the_single_process_batches(setup, stage):
    ray_b, ref_b = _ray_batches(setup, stage, 0), _reference(setup, stage, 0)
    assert len(ray_b) == len(ref_b) == 1
    _same(ray_b[0], ref_b[0])


def test_two_workers_split_each_global_batch(setup):
    full = _ray_batches(setup, 2, 1)[0]
    parts = [_ray_batches(setup, 2, 1, world=2, rank=r)[0] for r in (0, 1)]
    for k in ("image", "mask"):
        assert torch.equal(torch.cat([p[k] for p in parts]), full[k])
    for k in ("views", "boxes"):
        for v in range(len(full[k])):
            assert torch.equal(torch.cat([p[k][v] for p in parts]), full[k][v])


def test_epochs_differ_and_a_seed_reproduces(setup):
    e0, e0_again, e1 = (_ray_batches(setup, 1, e)[0] for e in (0, 0, 1))
    _same(e0, e0_again)
    both = _ray_batches(setup, 1, 0, epochs=2)  # one stream over two epochs, as a worker reads it
    assert len(both) == 2
    _same(both[0], e0)
    _same(both[1], e1)
    assert not torch.equal(e0["image"], e1["image"]), "two epochs made the same synthetic samples"
    other_seed = dict(setup, cfg=tiny_cfg(seed=1, **{"stage1.max_steps_per_epoch": 1}))
    assert not torch.equal(_ray_batches(other_seed, 1, 0)[0]["image"], e0["image"])


def test_epoch_dataset_rejects_a_batch_that_does_not_split(setup):
    spec = SampleSpec.build(setup["cfg"], 1, setup["mean"], setup["std"])
    with pytest.raises(ValueError, match="does not split over 3 workers"):
        epoch_dataset(setup["store"], len(setup["paths"]), spec, 0, 0, 3)


@pytest.mark.parametrize("actors", [0, 1, 2])  # 0: in this process (feature_actors: 0)
def test_bank_features_equal_single_process(setup, actors):
    cfg = setup["cfg"]
    split = load_split(setup["root"], "bottle", "mvtec")
    ex = FeatureExtractor(cfg.backbone.name, cfg.backbone.layers, cfg.backbone.weights)
    ref, grid = extract(PatchModel(ex, cfg.bank.patch_size, fast=cfg.backbone.fast_inference), _loader(split.train, Preprocess(cfg.data, ex.mean, ex.std), cfg, torch.device("cpu")))
    got, grid_r = extract_features(setup["paths"], cfg, cfg.backbone.weights, actors=actors, cpus=0.5)
    assert grid_r == grid and got.shape == ref.shape == (len(setup["paths"]) * grid[0] * grid[1], ref.shape[1])
    # same rows in the same image-major order (float summation may differ with thread counts)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    per_image = ref.reshape(len(setup["paths"]), -1)
    assert np.abs(got.reshape(len(setup["paths"]), -1) - per_image).max(axis=1).max() < 1e-4
    assert not np.allclose(per_image[0], per_image[1]), "images should differ (the order check needs it)"
