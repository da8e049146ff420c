"""The test-free validation objective: held-out normal images + another generator's anomalies."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tocoad_ray.config import ConfigError, load_config
from tocoad_ray.data import Preprocess, load_split, read_image
from tocoad_ray.models.backbone import FeatureExtractor
from tocoad_ray.pipeline import fit, load_detector
from tocoad_ray.validation import (QuickValidator, ValidationConfig, build_validation_set, holdout, resolve_generator,
                                   score_validation)


def test_holdout_is_seeded_disjoint_and_bounded():
    v = ValidationConfig(fraction=0.2, min_images=4, max_images=10)
    fit_a, val_a = holdout(100, v, seed=3)
    fit_b, val_b = holdout(100, v, seed=3)
    assert np.array_equal(val_a, val_b) and np.array_equal(fit_a, fit_b)
    assert len(val_a) == 10 and not set(fit_a) & set(val_a) and sorted({*fit_a, *val_a}) == list(range(100))
    assert not np.array_equal(holdout(100, v, seed=4)[1], val_a)
    assert len(holdout(12, v, 0)[1]) == 4  # min_images
    with pytest.raises(ConfigError, match="too few"):
        holdout(5, v, 0)


def test_validation_generator_is_never_a_training_generator():
    assert resolve_generator(ValidationConfig(), ["perlin"]) == "nsa"
    assert resolve_generator(ValidationConfig(), ["perlin", "nsa"]) == "cutpaste_scar"
    assert resolve_generator(ValidationConfig(generator="cutpaste"), ["perlin"]) == "cutpaste"
    with pytest.raises(ConfigError, match="also a training generator"):
        resolve_generator(ValidationConfig(generator="perlin"), ["perlin", "cutpaste"])
    with pytest.raises(ConfigError, match="validation.generator"):
        ValidationConfig(generator="gaussian")


@pytest.fixture(scope="module")
def bottle_val(data_root):
    cfg = load_config(None, {"method": "patchcore", "data.image_size": 96, "data.crop_size": 80})
    paths = [s.path for s in load_split(data_root / "mvtec_ad", "bottle").train][:12]
    ex = FeatureExtractor(cfg.backbone.name, cfg.backbone.layers)
    pre = Preprocess(cfg.data, ex.mean, ex.std)
    return cfg, paths, pre, ex


def test_validation_set_pairs_normal_and_anomalous_images(bottle_val):
    cfg, paths, pre, _ = bottle_val
    vs = build_validation_set(paths[:4], pre, "nsa", seed=0)
    again = build_validation_set(paths[:4], pre, "nsa", seed=0)
    assert vs.images.shape == (8, 3, 80, 80) and list(vs.labels) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert torch.equal(vs.images, again.images) and vs.digest() == again.digest()
    assert not vs.masks[:4].any()
    for i in range(4):  # every anomaly is visible after the crop, and only there does the image change
        m = vs.masks[4 + i]
        assert m.mean() >= 0.002
        diff = (vs.images[4 + i] - vs.images[i]).abs().amax(0).numpy()
        assert diff[m].mean() > 5 * diff[~m].mean()
    assert build_validation_set(paths[:4], pre, "cutpaste", seed=0).digest() != vs.digest()


def test_score_validation_separates_real_features(bottle_val, tmp_path, data_root):
    """A bottle PatchCore bank scores G_val's anomalies above the held-out normals, and the quick
    validator (bank = every patch of a few images) agrees with a full detector built the same way."""
    cfg, paths, pre, ex = bottle_val
    vs = build_validation_set(paths[8:12], pre, "nsa", seed=0)
    quick = QuickValidator(cfg, torch.stack([pre.image(read_image(p)) for p in paths[:8]]), vs)
    m = quick(ex)
    assert set(m) == {"val_score", "val_image_auroc", "val_pixel_auroc", "val_aupro"}
    assert m["val_image_auroc"] > 0.7 and m["val_pixel_auroc"] > 0.8
    assert m["val_score"] == pytest.approx(np.mean([m["val_image_auroc"], m["val_pixel_auroc"], m["val_aupro"]]))
    assert quick(ex) == m  # cached by F's weights
    # a random F is a different network: different score
    with torch.random.fork_rng():
        torch.manual_seed(0)
        rnd = FeatureExtractor(cfg.backbone.name, cfg.backbone.layers, "random")
    assert quick(rnd) != m

    # full artifact path: a fitted PatchCore detector scores the same set
    root = tmp_path / "data"
    from ._subset import mvtec_subset

    mvtec_subset(data_root / "mvtec_ad" / "bottle", root, 8, {"good": 1})
    art = tmp_path / "art"
    fit(load_config(None, {"method": "patchcore", "data.image_size": 96, "data.crop_size": 80, "bank.coreset_ratio": 1.0}),
        root, "bottle",
        art, progress=False, log=lambda m: None)
    full = score_validation(load_detector(art), vs)
    assert full["val_image_auroc"] > 0.7
