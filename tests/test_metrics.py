import json
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import f1_score, precision_recall_curve, roc_auc_score

from tocoad_ray.metrics import aupro, evaluate_scores, f1_max, image_auroc, pixel_auroc
from tocoad_ray.report import markdown_table, with_mean, write_results


# ---------------------------------------------------------------- AUROC / F1


@pytest.mark.parametrize("seed", range(5))
def test_image_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    s = rng.integers(0, 6, 200).astype(float)  # heavy ties
    assert image_auroc(y, s) == pytest.approx(roc_auc_score(y, s), rel=1e-12, abs=1e-12)
    s2 = rng.normal(size=200) + y
    assert image_auroc(y.astype(bool), s2) == pytest.approx(roc_auc_score(y, s2), rel=1e-12)


def test_image_auroc_one_class_raises():
    with pytest.raises(ValueError, match="only one class"):
        image_auroc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="only one class"):
        image_auroc([0, 0], [0.1, 0.2])


@pytest.mark.parametrize("seed", range(3))
def test_pixel_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    masks = rng.random((6, 32, 32)) < 0.1
    maps = (rng.integers(0, 20, masks.shape) + 3 * masks).astype(np.float32)
    ref = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(ref, rel=1e-12)


def test_auroc_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0, 1], [0.0, np.nan])


@pytest.mark.parametrize("seed", range(5))
def test_f1_max_matches_precision_recall_curve(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 150)
    s = rng.integers(0, 8, 150) + 0.7 * y + (seed % 2) * rng.normal(size=150)
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = np.nanmax(2 * p * r / (p + r))
    f1, thr = f1_max(y, s)
    assert f1 == pytest.approx(ref, rel=1e-12)
    # the threshold really achieves it, with "score >= threshold" as positive
    assert f1_score(y, s >= thr) == pytest.approx(f1, rel=1e-12)
    assert isinstance(f1, float) and isinstance(thr, float)


def test_f1_max_on_pixels():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 16, 16)) < 0.2
    maps = rng.random(masks.shape) + masks
    p, r, _ = precision_recall_curve(masks.ravel(), maps.ravel())
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = np.nanmax(2 * p * r / (p + r))
    assert f1_max(masks, maps)[0] == pytest.approx(ref, rel=1e-12)


# ---------------------------------------------------------------- AUPRO


def _hand_case():
    """One 4x4 image, one 2x2 region (top-left), 12 normal pixels.

    region scores: 0.9, 0.7, 0.5, 0.1
    normal scores: 0.8, 0.6, 0.1 (tied with a region pixel), and nine 0.0

    Thresholds, decreasing (FPR = normal above / 12, PRO = region above / 4):
        start      FPR 0     PRO 0
        t = 0.9    FPR 0     PRO 1/4
        t = 0.8    FPR 1/12  PRO 1/4
        t = 0.7    FPR 1/12  PRO 2/4
        t = 0.6    FPR 2/12  PRO 2/4
        t = 0.5    FPR 2/12  PRO 3/4
        t = 0.1    FPR 3/12  PRO 1      <- tie: one point, so a diagonal segment
        t = 0.0    FPR 1     PRO 1
    Trapezoids (vertical segments have zero width):
        [0, 1/12]     at 1/4                 -> 1/48
        [1/12, 2/12]  at 1/2                 -> 1/24
        [2/12, 3/12]  from 3/4 to 1          -> 1/12 * 7/8 = 7/96
        -> area up to FPR 1/4 = 2/96 + 4/96 + 7/96 = 13/96
    fpr_limit 0.3:  13/96 + (0.3 - 0.25) * 1 = 13/96 + 1/20 = 89/480;  / 0.3 -> 89/144
    fpr_limit 0.2:  0.2 lies on the diagonal: PRO(0.2) = 3/4 + 1/4 * (0.2 - 1/6) / (1/12) = 0.85,
                    1/48 + 1/24 + (1/30) * (0.75 + 0.85) / 2 = 1/16 + 2/75 = 107/1200;
                    / 0.2 -> 107/240
    fpr_limit 0.25: exactly on a curve point: 13/96 / (1/4) = 13/24
    fpr_limit 1.0:  13/96 + 3/4 = 85/96
    """
    mask = np.zeros((1, 4, 4), bool)
    mask[0, :2, :2] = True
    amap = np.zeros((1, 4, 4), np.float32)
    amap[0, 0, 0], amap[0, 0, 1], amap[0, 1, 0], amap[0, 1, 1] = 0.9, 0.7, 0.5, 0.1
    amap[0, 3, 3], amap[0, 3, 2], amap[0, 2, 3] = 0.8, 0.6, 0.1
    return mask, amap


@pytest.mark.parametrize(
    "limit, expected",
    [
        (0.3, Fraction(89, 144)),
        (0.2, Fraction(107, 240)),
        (0.25, Fraction(13, 24)),
        (1.0, Fraction(85, 96)),
    ],
)
def test_aupro_hand_case(limit, expected):
    mask, amap = _hand_case()
    assert aupro(mask, amap, fpr_limit=limit) == pytest.approx(float(expected), abs=1e-12)


def test_aupro_hand_case_float64_and_2d_input():
    mask, amap = _hand_case()
    # float32 0.1 and float64 0.1 differ, but the tie is inside one dtype either way
    assert aupro(mask[0], amap[0].astype(np.float64)) == pytest.approx(89 / 144, abs=1e-12)


def test_aupro_good_images_count_in_fpr():
    # Add an all-normal 4x4 image scored 0.0: 28 normal pixels. The curve
    # becomes (0,1/4) (1/28,1/4) (1/28,1/2) (2/28,1/2) (2/28,3/4) (3/28,1) (1,1):
    # area(0.3) = (1/4 + 1/2 + 7/8)/28 + (0.3 - 3/28) = 0.3 - (11/8)/28,
    # / 0.3 -> 1 - 55/336 = 281/336.
    mask, amap = _hand_case()
    masks = np.concatenate([mask, np.zeros_like(mask)])
    maps = np.concatenate([amap, np.zeros_like(amap)])
    assert aupro(masks, maps) == pytest.approx(281 / 336, abs=1e-12)


def test_aupro_regions_weighted_equally():
    # One 8x8 image: a 3x3 region and a separate 1-pixel region, normals at 0.5.
    # Big region at 1.0, small at 0.0: for FPR in [0, 1) the PRO is
    # mean(1, 0) = 1/2 per region -> AUPRO 0.5 (a pixel average would say 9/10).
    mask = np.zeros((1, 8, 8), bool)
    mask[0, 0:3, 0:3] = True
    mask[0, 6, 6] = True
    amap = np.full(mask.shape, 0.5)
    amap[0, 0:3, 0:3] = 1.0
    amap[0, 6, 6] = 0.0
    assert aupro(mask, amap) == pytest.approx(0.5, abs=1e-12)
    # Swapped: the pixel average would be 1/10, the region average is still 1/2.
    amap[0, 0:3, 0:3] = 0.0
    amap[0, 6, 6] = 1.0
    assert aupro(mask, amap) == pytest.approx(0.5, abs=1e-12)


def test_aupro_regions_across_images_weighted_equally():
    # Same as above but the two regions live in different images.
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 0:3, 0:3] = True
    masks[1, 6, 6] = True
    maps = np.full(masks.shape, 0.5)
    maps[0, 0:3, 0:3] = 1.0
    maps[1, 6, 6] = 0.0
    assert aupro(masks, maps) == pytest.approx(0.5, abs=1e-12)


def test_aupro_uses_8_connectivity():
    # Pixels (0,0), (1,1), (1,2): one region with 8-connectivity (3 pixels),
    # two regions {(0,0)}, {(1,1),(1,2)} with 4-connectivity.
    # Only (0,0) scores above the normals: PRO = 1/3 (8-conn) vs 1/2 (4-conn).
    mask = np.zeros((1, 6, 6), bool)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 1, 2] = True
    amap = np.full(mask.shape, 0.5)
    amap[0, 0, 0] = 1.0
    amap[0, 1, 1] = amap[0, 1, 2] = 0.0
    assert aupro(mask, amap) == pytest.approx(1 / 3, abs=1e-12)


def _random_masks(rng, n=5, h=24, w=24):
    masks = np.zeros((n, h, w), bool)
    for i in range(n - 1):  # last image stays good
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, h - 4, 2)
            dy, dx = rng.integers(1, 5, 2)
            masks[i, y : y + dy, x : x + dx] = True
    return masks


def test_aupro_perfect_and_inverted():
    rng = np.random.default_rng(1)
    masks = _random_masks(rng)
    noise = rng.random(masks.shape) * 0.5
    perfect = masks + noise  # every anomalous pixel above every normal one
    assert aupro(masks, perfect) == 1.0
    assert aupro(masks, -perfect) == pytest.approx(0.0, abs=1e-12)
    # mostly inverted: anomalous in [-0.45, 0.05), normal in [0, 0.5): within
    # FPR <= 0.3 (threshold ~0.35) no anomalous pixel is detected
    assert aupro(masks, noise - 0.45 * masks) < 0.01


def _reference_aupro(masks, maps, limit):
    """Slow, direct definition: loop over distinct thresholds and regions."""
    regions = []
    for i in range(masks.shape[0]):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3), int))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    normal = maps[~masks]
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        xs.append(np.mean(normal >= t))
        ys.append(np.mean([np.mean(maps[i][r] >= t) for i, r in regions]))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


@pytest.mark.parametrize("seed", range(4))
def test_aupro_matches_direct_definition_and_is_bounded(seed):
    rng = np.random.default_rng(seed)
    masks = _random_masks(rng, n=4, h=12, w=12)
    maps = (rng.integers(0, 15, masks.shape) + 4 * masks * rng.random(masks.shape)).round(1)
    for limit in (0.05, 0.3, 1.0):
        got = aupro(masks, maps, fpr_limit=limit)
        assert 0.0 <= got <= 1.0
        assert got == pytest.approx(_reference_aupro(masks, maps, limit), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_aupro_in_unit_interval_random(seed):
    rng = np.random.default_rng(seed)
    masks = _random_masks(rng)
    maps = rng.random(masks.shape).astype(np.float32)
    exact = aupro(masks, maps)
    assert 0.0 <= exact <= 1.0
    coarse = aupro(masks, maps, num_thresholds=2000)
    assert 0.0 <= coarse <= 1.0
    assert coarse == pytest.approx(exact, abs=0.02)


def test_aupro_no_regions_is_nan_and_bad_args():
    masks = np.zeros((2, 4, 4), bool)
    assert math.isnan(aupro(masks, np.random.default_rng(0).random(masks.shape)))
    mask, amap = _hand_case()
    with pytest.raises(ValueError):
        aupro(mask, amap, fpr_limit=0.0)
    with pytest.raises(ValueError):
        aupro(mask, amap[:, :3])


# ---------------------------------------------------------------- evaluate_scores


def test_evaluate_scores():
    mask, amap = _hand_case()
    masks = np.concatenate([mask, np.zeros_like(mask)])
    maps = np.concatenate([amap, np.zeros_like(amap)])
    labels = np.array([1, 0])
    scores = np.array([0.9, 0.1])
    out = evaluate_scores(labels, scores, masks, maps)
    assert set(out) == {"image_auroc", "pixel_auroc", "aupro", "f1_max", "f1_threshold"}
    assert all(type(v) is float for v in out.values())
    assert out["image_auroc"] == 1.0 and out["f1_max"] == 1.0 and out["f1_threshold"] == 0.9
    assert out["aupro"] == pytest.approx(281 / 336, abs=1e-12)
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))

    for m, a in [(None, None), (None, maps), (np.zeros_like(masks), maps)]:
        out = evaluate_scores(labels, scores, m, a)
        assert out["pixel_auroc"] is None and out["aupro"] is None
        assert type(out["image_auroc"]) is float


# ---------------------------------------------------------------- report


def _results():
    return {
        "bottle": {"image_auroc": 1.0, "pixel_auroc": 0.98123, "aupro": 0.9, "f1_max": 1.0,
                   "f1_threshold": np.float32(2.5), "n_test": 83, "ms_per_image": 12.345,
                   "fit_seconds": 30.0},
        "elpv": {"image_auroc": 0.8, "pixel_auroc": None, "aupro": None, "f1_max": 0.7,
                 "f1_threshold": 1.5, "n_test": 100, "ms_per_image": np.float64(10.0),
                 "fit_seconds": 40.25},
    }


def test_with_mean_ignores_none():
    rows = with_mean(_results())
    mean = rows["mean"]
    assert mean["image_auroc"] == pytest.approx(0.9)
    assert mean["pixel_auroc"] == pytest.approx(0.98123)  # only bottle has one
    assert mean["aupro"] == pytest.approx(0.9)
    assert mean["n_test"] == pytest.approx(91.5)
    assert mean["fit_seconds"] == pytest.approx(35.125)
    # recomputed, not averaged into itself
    assert with_mean(rows)["mean"] == mean


def test_write_results_round_trip(tmp_path):
    jp, mp = tmp_path / "out" / "results.json", tmp_path / "out" / "results.md"
    written = write_results(_results(), jp, mp)
    loaded = json.loads(jp.read_text())
    assert loaded == written
    assert list(loaded) == ["bottle", "elpv", "mean"]
    assert loaded["elpv"]["pixel_auroc"] is None
    assert loaded["mean"]["image_auroc"] == pytest.approx(0.9)
    assert sorted(p.name for p in jp.parent.iterdir()) == ["results.json", "results.md"]

    md = mp.read_text()
    assert md == markdown_table(loaded)
    lines = md.strip().splitlines()
    assert lines[0].startswith("| category | image_auroc | pixel_auroc | aupro | f1_max | f1_threshold")
    assert len(lines) == 2 + 3
    elpv = [c.strip() for c in lines[3].strip("|").split("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    row = dict(zip(header, elpv))
    assert row["pixel_auroc"] == "\u2013" and row["aupro"] == "\u2013"
    assert row["image_auroc"] == "0.800"
    assert row["n_test"] == "100"
    assert row["ms_per_image"] == "10.0" and row["fit_seconds"] == "40.2"
    bottle = dict(zip(header, [c.strip() for c in lines[2].strip("|").split("|")]))
    assert bottle["pixel_auroc"] == "0.981" and bottle["ms_per_image"] == "12.3"
    assert "**mean**" in lines[4]


def test_write_results_nan_becomes_null(tmp_path):
    res = {"a": {"aupro": float("nan"), "image_auroc": 0.5}}
    write_results(res, tmp_path / "r.json")
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded["a"]["aupro"] is None and loaded["mean"]["aupro"] is None
    assert "\u2013" in markdown_table(loaded)
