"""The drift watch's statistics (tocoad_ray/drift.py): against scipy on random samples, and on real
bottle scores: a stream of normal images raises no alarm, the same images darkened or blurred do.
The service's gauges are checked in tests/test_feedback.py (one Serve instance for both)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from tocoad_ray.drift import (DriftWindow, binom_sf, drift_stats, ks_critical, ks_pvalue, ks_statistic, ks_upward,
                              reference_scores)


def test_statistics_agree_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n, m, shift in [(64, 200, 0.0), (20, 10, 1.0), (8, 30, 0.3), (64, 50, -0.5)]:
        ref, w = rng.normal(0, 1, n), rng.normal(shift, 1, m)
        assert ks_statistic(w, ref) == pytest.approx(stats.ks_2samp(w, ref).statistic)
        # "less": the window's CDF lies below the reference's, i.e. its scores run higher
        up = stats.ks_2samp(w, ref, alternative="less", method="asymp")
        assert ks_upward(w, ref) == pytest.approx(up.statistic)
        assert ks_pvalue(up.statistic, n, m) == pytest.approx(up.pvalue, rel=1e-9)
    for k, m, p in [(0, 10, 0.1), (3, 50, 0.02), (10, 200, 0.01), (200, 200, 0.3)]:
        assert binom_sf(k, m, p) == pytest.approx(stats.binom.sf(k - 1, m, p), rel=1e-9, abs=1e-300)
    d = ks_critical(0.01, 64, 200)
    assert ks_pvalue(d, 64, 200) == pytest.approx(0.01, rel=1e-6)


def test_reference_from_stored_quantiles_and_bounded_window():
    meta = {"score_stats": {"n": 64, "min": 1.0, "q50": 2.0, "q95": 3.0, "q99": 3.5, "max": 4.0}}
    ref = reference_scores(meta)
    assert len(ref) == 64 and np.quantile(ref, 0.5) == pytest.approx(2.0, abs=0.05)
    assert ref.min() >= 1.0 and ref.max() <= 4.0
    assert reference_scores({"normal_scores": [1.0, 2.0], "score_stats": meta["score_stats"]}).tolist() == [1.0, 2.0]
    w = DriftWindow(ref, threshold=3.5, window=50, min_images=20, trend_every=10, trend_points=3)
    rng = np.random.default_rng(0)
    for _ in range(40):
        w.add(rng.choice(ref, 25))  # scores like the normal ones
    st = w.stats()
    assert len(w.scores) == 50 and len(w.trend) == 3 and st["seen"] == 1000 and st["images"] == 50
    assert st["alarm"] is False
    # push (the service's path: statistics only when asked for) ends where add does
    v = DriftWindow(ref, threshold=3.5, window=50, min_images=20, trend_every=10, trend_points=3)
    rng = np.random.default_rng(0)
    for _ in range(40):
        v.push(rng.choice(ref, 25))
    pushed = v.stats()
    assert {k: pushed[k] for k in ("ks", "share_above", "alarm", "images", "seen")} == \
        {k: st[k] for k in ("ks", "share_above", "alarm", "images", "seen")}
    assert [t[1:] for t in v.trend] == [t[1:] for t in w.trend]
    v.push([9.0] * 50)  # a shifted window: the next stats see it
    assert v.stats()["alarm"] is True
    quiet = drift_stats(np.array([2.0] * 5 + [9.0] * 5), ref, 3.5, min_images=20)
    assert quiet["alarm"] is False and quiet["share_above"] == 0.5  # too few images to raise it


@pytest.fixture(scope="module")
def bottle(tmp_path_factory, data_root):
    from tocoad_ray.data import load_split
    from tocoad_ray.pipeline import load_detector

    from .test_feedback import fitted_artifact

    root, art = fitted_artifact(tmp_path_factory.getbasetemp(), Path(data_root))
    det = load_detector(art)
    good = [Image.open(s.path).convert("RGB") for s in load_split(root, "bottle", "mvtec").test if s.label == 0]
    return det, good


def _scores(det, images) -> np.ndarray:
    import torch

    x = torch.stack([det.preprocess.image(np.asarray(im)) for im in images])
    return np.concatenate([det.score(x[i:i + 8])[0] for i in range(0, len(x), 8)])


@pytest.mark.parametrize("shift", ["darker", "blur"])
def test_alarm_rises_for_the_shifted_stream_only(bottle, shift):
    det, good = bottle
    change = {"darker": lambda im: ImageEnhance.Brightness(im).enhance(0.6),
              "blur": lambda im: im.filter(ImageFilter.GaussianBlur(3))}[shift]
    ref = reference_scores(det.meta)
    assert len(ref) == det.meta["score_stats"]["n"]  # the stored leave-one-out scores
    normal, shifted = _scores(det, good), _scores(det, [change(im) for im in good])
    w = DriftWindow(ref, det.threshold, window=len(good), min_images=10, alpha=0.01)
    st = w.add(normal)
    assert st["alarm"] is False, st
    st = w.add(shifted)  # the window now holds only the shifted stream
    assert st["alarm"] is True and "shift" in st["reasons"] and st["ks"] > st["ks_critical"], st
