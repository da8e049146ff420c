"""Verdict thresholds: the quantile of normal scores and the one set by synthetic anomalies (a
recall target under a false-alarm bound), and an artifact fitted with ``bank.threshold_mode:
synthetic`` on real images, whose recorded rates are what its own scores give."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tocoad_ray.bank.threshold import (fpr_threshold, quantile_threshold, rates, recall_threshold,
                                       synthetic_threshold)
from tocoad_ray.config import ConfigError, load_config


def test_recall_threshold_is_the_highest_that_reaches_the_target():
    a = np.array([5.0, 1.0, 4.0, 2.0, 3.0])
    assert recall_threshold(a, 0.6) == 3.0  # 3 of 5 flagged
    assert recall_threshold(a, 0.61) == 2.0  # 3 are not enough: 4
    assert recall_threshold(a, 1.0) == 1.0
    for r in (0.1, 0.33, 0.5, 0.8, 0.95):
        t = recall_threshold(a, r)
        assert (a >= t).mean() >= r and (a >= np.nextafter(t, np.inf)).mean() < r


def test_fpr_threshold_is_the_lowest_within_the_bound():
    n = np.arange(100, dtype=np.float32)  # 0..99
    t = fpr_threshold(n, 0.05)
    assert (n >= t).mean() == 0.05 and (n >= np.nextafter(np.float32(t), np.float32(-np.inf))).mean() > 0.05
    assert (n >= fpr_threshold(n, 0.0)).sum() == 0
    # ties: equal scores fall on the same side, the bound still holds
    tied = np.array([1.0, 2.0, 2.0, 2.0, 3.0])
    assert (tied >= fpr_threshold(tied, 0.4)).mean() <= 0.4
    # a float32 round trip keeps the verdicts (the service and exported models compare in float32)
    assert (n >= np.float32(t)).mean() == 0.05


def test_synthetic_threshold_recall_target_and_false_alarm_bound():
    rng = np.random.default_rng(0)
    normal = rng.normal(0.0, 1.0, 200)
    easy = rng.normal(5.0, 1.0, 100)
    s = synthetic_threshold(normal, easy, target_recall=0.9, max_fpr=0.05)
    assert s.bound == "recall" and s.recall >= 0.9 and s.fpr <= 0.05
    assert s.threshold == s.recall_threshold > s.fpr_threshold
    # anomalies that overlap the normals: the bound wins, the recall falls short and says so
    hard = rng.normal(0.5, 1.0, 100)
    h = synthetic_threshold(normal, hard, target_recall=0.9, max_fpr=0.05)
    assert h.bound == "fpr" and h.fpr <= 0.05 and h.recall < 0.9 and h.threshold == h.fpr_threshold
    assert h.recall == rates(normal, hard, h.threshold)["tpr"]
    assert json.loads(json.dumps(h.to_dict()))["n_anomalous"] == 100


def test_rates_and_bad_input():
    r = rates(np.array([0.0, 1.0, 2.0, 3.0]), np.array([2.0, 3.0, 4.0]), 2.0)
    assert r["tpr"] == 1.0 and r["fpr"] == 0.5 and r["precision"] == 0.6 and r["f1"] == pytest.approx(0.75)
    assert quantile_threshold(np.arange(101.0), 0.99) == pytest.approx(99.0)
    with pytest.raises(ValueError, match="not finite"):
        synthetic_threshold(np.array([0.0, np.nan]), np.array([1.0]))
    with pytest.raises(ValueError, match="no scores"):
        recall_threshold(np.array([]), 0.5)
    with pytest.raises(ValueError, match="target recall"):
        recall_threshold(np.array([1.0]), 0.0)
    with pytest.raises(ValueError, match="false-alarm bound"):
        fpr_threshold(np.array([1.0]), 1.0)


def test_config_checks_the_threshold_settings():
    assert load_config(None).bank.threshold_mode == "loo"
    with pytest.raises(ConfigError, match="bank.threshold_mode"):
        load_config(None, {"bank.threshold_mode": "test"})
    with pytest.raises(ConfigError, match="bank.threshold_recall"):
        load_config(None, {"bank.threshold_recall": 0.0})
    with pytest.raises(ConfigError, match="bank.threshold_max_fpr"):
        load_config(None, {"bank.threshold_max_fpr": 1.0})
    with pytest.raises(ConfigError, match="bank.threshold_generator"):
        load_config(None, {"bank.threshold_generator": "paint"})


def test_fit_records_both_thresholds(data_root, tmp_path):
    """A tiny PatchCore fit on real bottle images in synthetic mode: both thresholds in the
    artifact, the synthetic one active, its recorded recall / false-alarm rate reproduced from
    the recorded scores, and the loo one equal to what loo mode writes."""
    from tests._subset import mvtec_subset
    from tocoad_ray.artifact import read_meta
    from tocoad_ray.pipeline import fit

    root = tmp_path / "data"
    mvtec_subset(data_root / "mvtec_ad" / "bottle", root, 8, {"good": 1, "broken_large": 1})
    base = {"method": "patchcore", "backbone.weights": "random", "data.image_size": 64, "data.crop_size": None,
            "bank.batch_size": 8, "bank.threshold_images": 8}
    syn = fit(load_config(None, {**base, "bank.threshold_mode": "synthetic"}), root, "bottle", tmp_path / "syn",
              progress=False, log=lambda m: None)
    loo = fit(load_config(None, base), root, "bottle", tmp_path / "loo", progress=False, log=lambda m: None)
    th = syn["thresholds"]
    assert th["active"] == "synthetic" and syn["threshold"] == th["synthetic"]
    assert th["loo"] == loo["threshold"] == loo["thresholds"]["loo"] and loo["thresholds"]["active"] == "loo"
    assert "synthetic" not in loo["thresholds"]
    d = th["synthetic_fit"]
    assert d["generator"] == "perlin" and d["n_normal"] == 8 and d["n_anomalous"] == 8
    r = rates(np.array(d["normal_scores"]), np.array(d["anomalous_scores"]), th["synthetic"])
    assert r["tpr"] == d["recall"] and r["fpr"] == d["fpr"] <= 0.05 + 1e-9
    assert read_meta(tmp_path / "syn")["thresholds"] == th
