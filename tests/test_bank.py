"""Memory bank: greedy coreset (eq. 7), exact k-NN, eq. 8/9 scoring, anomaly maps, leave-one-out."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tocoad_ray.bank.coreset import (_greedy_pruned, _pca_rotate, covering_radius, greedy_coreset,
                                     greedy_coreset_reference, random_projection)
from tocoad_ray.bank.knn import KNNIndex
from tocoad_ray.bank.memory_bank import MemoryBank
from tocoad_ray.bank.scoring import anomaly_maps, patch_scores, reweighted_image_scores


def clustered(n: int = 4000, d: int = 32, n_clusters: int = 25, seed: int = 0) -> np.ndarray:
    """Blobs of very different sizes and spreads (like patch features: a few dense modes, rare outliers)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, size=(n_clusters, d))
    weights = rng.dirichlet(np.full(n_clusters, 0.3))
    lab = rng.choice(n_clusters, size=n, p=weights)
    spread = rng.uniform(0.2, 2.0, size=n_clusters)
    return (centres[lab] + rng.normal(size=(n, d)) * spread[lab, None]).astype(np.float32)


def _first(n: int, seed: int) -> int:
    """The first centre greedy_coreset draws for ``seed``."""
    return int(np.random.default_rng(seed).integers(n))


# ---------------------------------------------------------------- coreset quality


def test_coreset_beats_random_on_clustered_data():
    x = clustered()
    k = 80
    ours = covering_radius(x, greedy_coreset(x, k, projection_dim=None, seed=0))
    rand = [covering_radius(x, np.random.default_rng(s).choice(len(x), k, replace=False)) for s in range(5)]
    assert ours < 0.8 * min(rand), (ours, rand)


def test_coreset_with_projection_beats_random_on_clustered_data():
    x = clustered(d=256)  # projected to 128 dims for selection, radius measured in the full 256
    k = 80
    ours = covering_radius(x, greedy_coreset(x, k, projection_dim=128, seed=0))
    rand = [covering_radius(x, np.random.default_rng(s).choice(len(x), k, replace=False)) for s in range(5)]
    assert ours < 0.8 * min(rand), (ours, rand)


@pytest.fixture(scope="module")
def bottle_features(data_root):
    """Real Lite0 patch features of 6 bottle training images at 128 px (6 × 16 × 16 = 1536 × 152)."""
    import torch
    from torch.utils.data import DataLoader

    from tocoad_ray.config import load_config
    from tocoad_ray.data import ImageDataset, Preprocess, load_split
    from tocoad_ray.models.backbone import FeatureExtractor
    from tocoad_ray.patch_model import PatchModel
    from tocoad_ray.pipeline import extract

    cfg = load_config(None, {"method": "patchcore", "data.image_size": 128, "data.crop_size": None})
    split = load_split(data_root / "mvtec_ad", "bottle", "mvtec")
    ext = FeatureExtractor(cfg.backbone.name, cfg.backbone.layers, "pretrained")
    torch.manual_seed(0)
    x, grid = extract(PatchModel(ext, 3), DataLoader(ImageDataset(split.train[::35][:6], Preprocess(cfg.data, ext.mean, ext.std)),
                                                     batch_size=6))
    assert grid == (16, 16) and x.shape == (6 * 256, 152)
    return x


def test_coreset_beats_random_on_bottle_features(bottle_features):
    x = bottle_features
    k = 77  # 5 %
    ours = covering_radius(x, greedy_coreset(x, k, projection_dim=128, seed=0))
    rand = [covering_radius(x, np.random.default_rng(s).choice(len(x), k, replace=False)) for s in range(5)]
    assert ours < 0.85 * min(rand), (ours, rand)
    # and close to the exact greedy loop in the full space (no projection)
    exact = covering_radius(x, greedy_coreset_reference(x, k, _first(len(x), 0)))
    assert ours < 1.15 * exact, (ours, exact)


# ---------------------------------------------------------------- ε-approximate greedy in rounds (the default)


def _replay_slack(x: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """For each pick t ≥ 1: its distance to picks 0..t−1 divided by the farthest point's (float64)."""
    x = x.astype(np.float64)
    mind = np.sqrt(((x - x[sel[0]]) ** 2).sum(1))
    out = []
    for c in sel[1:]:
        out.append(mind[c] / mind.max())
        mind = np.minimum(mind, np.sqrt(((x - x[c]) ** 2).sum(1)))
    return np.array(out)


@pytest.mark.parametrize("d,eps", [(16, 0.02), (100, 0.02), (100, 0.2)])
def test_batched_every_pick_is_an_eps_farthest_point(d, eps):
    """The defining property of the relaxed greedy: when picked, a centre is at least (1 − ε)× as far
    from the selection as the farthest point (d = 100 exercises the leading-coordinate screening)."""
    x = clustered(3000, d, seed=5)
    sel = greedy_coreset(x, 300, projection_dim=None, seed=1, eps=eps)
    assert len(np.unique(sel)) == 300 and sel[0] == _first(len(x), 1)
    ratio = _replay_slack(x, sel)
    assert ratio.min() >= 1.0 - eps - 1e-4, ratio.min()
    # rounds really batch: with a large ε some picks are not the exact farthest point
    if eps >= 0.2:
        assert ratio.min() < 0.999


def test_batched_radius_within_5pct_of_exact_on_bottle_features(bottle_features):
    x = bottle_features
    k = 154  # 10 %
    exact = covering_radius(x, greedy_coreset(x, k, projection_dim=None, seed=0))
    ours = covering_radius(x, greedy_coreset(x, k, projection_dim=None, seed=0, eps=0.02))
    assert ours <= 1.05 * exact, (ours, exact)


def test_batched_radius_within_5pct_of_exact_on_uniform_data():
    """Uniform high-dimensional data (a texture's patches) defeats the pruning; batching must still
    keep the radius close to exact greedy."""
    x = np.random.default_rng(0).normal(size=(4000, 96)).astype(np.float32)
    exact = covering_radius(x, greedy_coreset(x, 400, projection_dim=None, seed=0))
    ours = covering_radius(x, greedy_coreset(x, 400, projection_dim=None, seed=0, eps=0.02))
    assert ours <= 1.05 * exact, (ours, exact)


def test_batched_seeded_reproducibility_and_duplicates():
    x = clustered(2000, 80, seed=2)
    a = greedy_coreset(x, 150, projection_dim=None, seed=3, eps=0.05)
    np.testing.assert_array_equal(a, greedy_coreset(x, 150, projection_dim=None, seed=3, eps=0.05))
    assert not np.array_equal(a, greedy_coreset(x, 150, projection_dim=None, seed=4, eps=0.05))
    # 5 distinct rows repeated: the first 5 picks cover everything, the rest fill up without repeats
    y = np.repeat(clustered(5, 8, seed=1), 20, axis=0)
    sel = greedy_coreset(y, 12, projection_dim=None, seed=0, eps=0.02)
    assert len(np.unique(sel)) == 12
    assert covering_radius(y, sel[:5]) == 0.0
    with pytest.raises(ValueError, match="eps"):
        greedy_coreset(x, 10, eps=1.0)


def test_memory_bank_build_uses_eps():
    x = clustered(3000, 100, seed=6)
    exact = MemoryBank.build(x, ratio=0.05, projection_dim=None, eps=0.0)
    fast = MemoryBank.build(x, ratio=0.05, projection_dim=None, eps=0.2)
    assert len(exact) == len(fast) == 150
    assert not np.array_equal(exact.bank, fast.bank)  # a different (relaxed) selection ...
    assert fast.search(x, 1)[0].max() <= 1.25 * exact.search(x, 1)[0].max()  # ... of similar quality


# ---------------------------------------------------------------- exactness vs the plain greedy loop


@pytest.mark.parametrize("n,d,k,seed", [(2000, 16, 150, 0), (3000, 64, 300, 1), (500, 3, 499, 2)])
def test_greedy_identical_to_plain_loop(n, d, k, seed):
    """greedy_coreset = _greedy_pruned on the PCA-rotated (projected) features; the pruned loop must
    pick exactly the indices the plain loop picks on those same features."""
    x = clustered(n, d, seed=seed)
    sel = greedy_coreset(x, k, projection_dim=None, seed=seed)
    z = _pca_rotate(random_projection(x, None, seed))
    ref = greedy_coreset_reference(z, k, _first(n, seed))
    np.testing.assert_array_equal(sel, ref)
    assert len(np.unique(sel)) == k


def test_greedy_matches_plain_loop_on_unrotated_data():
    """On the raw (un-rotated) features the plain loop sees different float rounding, so the
    selections may differ at near-ties; the covering radius agrees to float precision."""
    x = clustered(2000, 16, seed=3)
    k = 120
    sel = greedy_coreset(x, k, projection_dim=None, seed=0)
    ref = greedy_coreset_reference(x, k, _first(len(x), 0))
    assert sel[0] == ref[0]
    r_sel, r_ref = covering_radius(x, sel), covering_radius(x, ref)
    assert abs(r_sel - r_ref) <= 1e-5 * max(1.0, r_ref), (r_sel, r_ref)
    # for continuous data without near-ties the selections are in fact the same
    assert np.mean(sel == ref) > 0.95


def test_greedy_identical_with_projection():
    """With a projection (d > projection_dim) the result equals the plain loop on the rotated projection."""
    x = clustered(1500, 200, seed=4)
    k = 100
    sel = greedy_coreset(x, k, projection_dim=64, seed=7)
    z = _pca_rotate(random_projection(x, 64, 7))
    np.testing.assert_array_equal(sel, _greedy_pruned(z, k, _first(len(x), 7), False))
    np.testing.assert_array_equal(sel, greedy_coreset_reference(z, k, _first(len(x), 7)))


def test_random_projection_identity_and_shape():
    x = clustered(100, 16)
    np.testing.assert_array_equal(random_projection(x, None), x)
    np.testing.assert_array_equal(random_projection(x, 32), x)  # d <= dim: unchanged
    z = random_projection(clustered(100, 300), 64, seed=1)
    assert z.shape == (100, 64) and z.dtype == np.float32 and z.flags.c_contiguous
    np.testing.assert_array_equal(z, random_projection(clustered(100, 300), 64, seed=1))


# ---------------------------------------------------------------- edge cases


def test_duplicates_are_covered_without_repeats():
    rng = np.random.default_rng(0)
    distinct = rng.normal(size=(10, 8)).astype(np.float32)
    x = np.repeat(distinct, 50, axis=0)[rng.permutation(500)]
    sel = greedy_coreset(x, 10, projection_dim=None, seed=0)
    assert len(np.unique(sel)) == 10
    # one representative of each distinct point → radius 0
    assert covering_radius(x, sel) == 0.0
    assert len({tuple(v) for v in x[sel]}) == 10
    # asking for more than the distinct points: still valid, unique indices, radius 0
    sel = greedy_coreset(x, 25, projection_dim=None, seed=0)
    assert len(sel) == 25 and len(np.unique(sel)) == 25 and covering_radius(x, sel) == 0.0


def test_all_identical_points():
    x = np.ones((100, 5), dtype=np.float32)
    sel = greedy_coreset(x, 7, projection_dim=None, seed=3)
    assert len(sel) == 7 and len(np.unique(sel)) == 7
    assert sel.min() >= 0 and sel.max() < 100
    assert covering_radius(x, sel) == 0.0


def test_n_select_at_least_n_returns_every_row():
    x = clustered(50, 4)
    for k in (50, 51, 1000):
        sel = greedy_coreset(x, k, projection_dim=None)
        assert sorted(sel.tolist()) == list(range(50))
    assert len(greedy_coreset(x, 0)) == 1  # at least one centre
    with pytest.raises(ValueError, match="at least one"):
        greedy_coreset(np.zeros((0, 4), np.float32), 3)


def test_memory_bank_build_ratio_one_keeps_all():
    x = clustered(40, 4)
    bank = MemoryBank.build(x, ratio=1.0, source_image=np.arange(40) // 10)
    np.testing.assert_array_equal(bank.bank, x)
    np.testing.assert_array_equal(bank.source_image, np.arange(40) // 10)
    bank = MemoryBank.build(x, ratio=0.25, source_image=np.arange(40) // 10)
    assert len(bank) == 10
    with pytest.raises(ValueError, match="empty"):
        MemoryBank.build(np.zeros((0, 4), np.float32))


def test_seeded_reproducibility():
    x = clustered(3000, 200)
    a = greedy_coreset(x, 100, projection_dim=128, seed=5)
    b = greedy_coreset(x, 100, projection_dim=128, seed=5)
    np.testing.assert_array_equal(a, b)
    c = greedy_coreset(x, 100, projection_dim=128, seed=6)
    assert not np.array_equal(a, c)
    assert a[0] == _first(len(x), 5)


# ---------------------------------------------------------------- k-NN


@pytest.mark.parametrize("k", [1, 9])
def test_knn_equals_brute_force(k):
    rng = np.random.default_rng(k)
    bank = rng.normal(size=(700, 24)).astype(np.float32)
    q = rng.normal(size=(300, 24)).astype(np.float32)
    d, i = KNNIndex(bank).search(q, k)
    full = np.sqrt(((q[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1))
    order = np.argsort(full, axis=1, kind="stable")[:, :k]
    ref_d = np.take_along_axis(full, order, 1)
    assert d.shape == (300, k) and i.shape == (300, k)
    np.testing.assert_allclose(d, ref_d, rtol=1e-5, atol=1e-5)
    # indices agree except where two neighbours are tied to float32 precision
    gaps = np.diff(np.sort(full, axis=1)[:, : k + 1], axis=1)
    clear = (gaps > 1e-4).all(1)
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(i[clear], order[clear])


def test_knn_k_clipped_and_bad_shapes():
    bank = np.eye(3, dtype=np.float32)
    index = KNNIndex(bank)
    d, i = index.search(bank, 10)
    assert d.shape == (3, 3)
    np.testing.assert_array_equal(i[:, 0], [0, 1, 2])
    np.testing.assert_allclose(d[:, 0], 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="queries"):
        index.search(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="non-empty"):
        KNNIndex(np.zeros((0, 3), np.float32))


# ---------------------------------------------------------------- eq. 8 / eq. 9 by hand


def hand_bank() -> MemoryBank:
    # c0 = (0,0), c1 = (1,0), c2 = (0,1), c3 = (10,10)
    return MemoryBank(np.array([[0, 0], [1, 0], [0, 1], [10, 10]], np.float32))


def test_eq8_patch_scores_by_hand():
    bank = hand_bank()
    patches = np.array([[0.5, 0], [3, 0], [0, 4], [9, 10]], np.float32)
    s, nn = patch_scores(bank, patches)
    # (0.5,0): c0 and c1 both at 0.5 (tie); (3,0): c1 at 2; (0,4): c2 at 3; (9,10): c3 at 1
    np.testing.assert_allclose(s, [0.5, 2.0, 3.0, 1.0], atol=1e-6)
    assert nn[0] in (0, 1)
    np.testing.assert_array_equal(nn[1:], [1, 2, 3])


def test_eq9_reweighting_by_hand():
    bank = hand_bank()
    # one image with two patches: p_a = (0.5, 0) (s' = 0.5) and p_b = (3, 0) (s' = 2, c* = c1)
    patches = np.array([[0.5, 0], [3, 0]], np.float32)
    s, nn = patch_scores(bank, patches)
    # The most anomalous patch is p_b, s' = ‖(3,0) − (1,0)‖ = 2, c* = c1.
    # N_3(c1): the 3 bank items nearest c1 = c1 (0), c0 (1), c2 (√2)   [c3 is √181 away]
    # E(p_b, ·) over N_3(c1): ‖(3,0)−(1,0)‖ = 2, ‖(3,0)−(0,0)‖ = 3, ‖(3,0)−(0,1)‖ = √10 ≈ 3.16227766
    # Σ exp(E) = e² + e³ + e^√10 = 7.389056099 + 20.085536923 + 23.624342922 = 51.098935944
    # weight = 1 − exp(s')/Σ = 1 − 7.389056099/51.098935944 = 1 − 0.144603 = 0.855397065
    # s = weight · s' = 0.855397065 · 2 = 1.710794131
    expected = (1.0 - math.exp(2.0) / (math.exp(2.0) + math.exp(3.0) + math.exp(math.sqrt(10.0)))) * 2.0
    assert abs(expected - 1.710794130546721) < 1e-12
    score = reweighted_image_scores(bank, patches, s, nn, n_images=1, b=3)
    assert score.shape == (1,)
    assert abs(score[0] - expected) < 1e-9
    # MemoryBank.score is eq. 8 + eq. 9 together
    img, s2 = bank.score(patches, 1, b=3)
    assert abs(img[0] - expected) < 1e-9
    np.testing.assert_allclose(s2, [0.5, 2.0], atol=1e-6)


def test_eq9_special_cases():
    bank = hand_bank()
    patches = np.array([[0.5, 0], [3, 0], [0, 0.25], [0, 4]], np.float32)  # two images, P = 2
    s, nn = patch_scores(bank, patches)
    # b = 1: N_1(c*) = {c*}, weight = 1 − e^{s'}/e^{s'} = 0
    np.testing.assert_allclose(reweighted_image_scores(bank, patches, s, nn, 2, b=1), 0.0, atol=1e-12)
    # image 2: max patch (0,4), s' = 3, c* = c2; N_2(c2) = {c2, c0}; E = 3, 4
    # weight = 1 − e³/(e³ + e⁴) = 1 − 1/(1 + e) = 0.731058579; s = 3 · 0.731058579 = 2.193175738
    out = reweighted_image_scores(bank, patches, s, nn, 2, b=2)
    assert abs(out[1] - 3.0 * (1.0 - 1.0 / (1.0 + math.e))) < 1e-9
    # a query far away from everything: large distances must not overflow exp
    far = np.array([[1000, 0], [2000, 0]], np.float32)
    s, nn = patch_scores(bank, far)
    out = reweighted_image_scores(bank, far, s, nn, 1, b=4)
    assert np.isfinite(out).all() and 0 < out[0] < s.max()


# ---------------------------------------------------------------- anomaly maps


def test_anomaly_maps_shape_and_blur():
    grid = np.zeros((2, 8, 8), np.float32)
    grid[0, 3, 4] = 1.0  # one hot patch
    maps = anomaly_maps(grid, 64, sigma=4.0)
    assert maps.shape == (2, 64, 64) and maps.dtype == np.float32
    np.testing.assert_allclose(maps[1], 0.0, atol=1e-7)
    m = maps[0]
    y, x = np.unravel_index(np.argmax(m), m.shape)
    assert 24 <= y < 32 and 32 <= x < 40  # peak over the hot patch (patch 3,4 → pixels 24..31 × 32..39)
    assert m.max() < 1.0  # blurred down
    # spread: well beyond the 8×8 pixel footprint of the patch and its bilinear halo
    assert (m > 1e-3).sum() > 2 * 16 * 16
    assert m[y, x - 12] > 1e-3 and m[y - 12, x] > 1e-3
    # without blur: bilinear upsampling only, the peak keeps most of its value, far pixels are 0
    sharp = anomaly_maps(grid, 64, sigma=0)
    assert sharp[0].max() > 0.8 and sharp[0, 0, 0] == 0.0 and (sharp[0] > 0).sum() < (m > 1e-3).sum()
    # non-square output size
    assert anomaly_maps(grid, (48, 80)).shape == (2, 48, 80)


# ---------------------------------------------------------------- leave-one-out


def test_leave_one_out_excludes_own_rows():
    # rows 0, 1 come from training image 0, rows 2, 3 from image 1
    vecs = np.array([[0, 0], [5, 0], [0, 3], [10, 10]], np.float32)
    bank = MemoryBank(vecs, source_image=np.array([0, 0, 1, 1]))
    # image 0's patches sit right next to its own rows
    patches = np.array([[0, 0.1], [5, 0.2]], np.float32)
    plain, s_plain = bank.score(patches, 1, b=2)
    np.testing.assert_allclose(s_plain, [0.1, 0.2], atol=1e-6)
    loo = bank.leave_one_out_scores(patches, np.array([0]), 1, b=2, k=4)
    # own rows excluded: (0,0.1) → (0,3) at 2.9; (5,0.2) → (0,3) at √(25 + 2.8²) = √32.84 ≈ 5.7306
    s_exp = np.array([2.9, math.sqrt(25 + 2.8**2)], np.float32)
    nn_exp = np.array([2, 2])
    expected = reweighted_image_scores(bank, patches, s_exp, nn_exp, 1, b=2)
    # by hand: max patch (5,0.2), c* = (0,3), N_2(c*) = {(0,3), (0,0)}; E = 5.7306, 5.0040
    e1, e2 = math.sqrt(32.84), math.sqrt(25 + 0.04)
    assert abs(expected[0] - (1 - math.exp(e1) / (math.exp(e1) + math.exp(e2))) * e1) < 1e-5
    np.testing.assert_allclose(loo, expected, rtol=1e-6)
    assert loo[0] > 5 * plain[0]
    # the same patches claimed by image 1 keep their own-image (image 0) neighbours
    np.testing.assert_allclose(bank.leave_one_out_scores(patches, np.array([1]), 1, b=2, k=4), plain, rtol=1e-6)


def test_leave_one_out_two_images_and_fallback():
    vecs = np.array([[0, 0], [5, 0], [0, 3], [10, 10]], np.float32)
    bank = MemoryBank(vecs, source_image=np.array([0, 0, 1, 1]))
    patches = np.array([[0, 0.1], [5, 0.2], [0, 3.1], [10, 9]], np.float32)  # image 0, then image 1
    loo = bank.leave_one_out_scores(patches, np.array([0, 1]), 2, b=2, k=4)
    per = [bank.leave_one_out_scores(patches[2 * j: 2 * j + 2], np.array([j]), 1, b=2, k=4)[0] for j in (0, 1)]
    np.testing.assert_allclose(loo, per, rtol=1e-6)
    # k = 1: the only neighbour is an own row → falls back to it (a lower bound), i.e. the plain score
    plain, _ = bank.score(patches[:2], 1, b=2)
    np.testing.assert_allclose(bank.leave_one_out_scores(patches[:2], np.array([0]), 1, b=2, k=1), plain, rtol=1e-6)


# ---------------------------------------------------------------- fast search: IVF + exact maxima
def test_ivf_image_scores_equal_exact_on_real_features(data_root, tmp_path):
    """Bottle features at 128 px: the IVF index (even at nprobe 1, a poor approximation) gives the
    exact path's image scores (eq. 9 on the exact maximum), and its s' never undercut the exact ones."""
    from tocoad_ray.bank.scoring import patch_scores
    from tocoad_ray.config import load_config
    from tocoad_ray.data import Preprocess, load_split, read_image
    from tocoad_ray.models.backbone import FeatureExtractor
    from tocoad_ray.patch_model import PatchModel

    cfg = load_config(None, {"method": "patchcore", "data.image_size": 128, "data.crop_size": None})
    split = load_split(data_root / "mvtec_ad", "bottle")
    ex = FeatureExtractor(cfg.backbone.name, cfg.backbone.layers)
    model, pre = PatchModel(ex, 3), Preprocess(cfg.data, ex.mean, ex.std)
    train = torch.stack([pre.image(read_image(s.path)) for s in split.train[::10]])
    test = torch.stack([pre.image(read_image(s.path)) for s in split.test[::4]])
    bank_rows = model.embed(train)[0]
    rows, (h, w) = model.embed(test)
    n = len(test)
    exact = MemoryBank(bank_rows)
    want, s_exact = exact.score(rows, n, 9)
    approx = {}
    for nprobe in (1, 4):
        ivf = MemoryBank(bank_rows, search="ivf", nprobe=nprobe)
        assert ivf.approximate and ivf.index.kind == "ivf"
        approx[nprobe], _ = patch_scores(ivf, rows)
        assert (approx[nprobe] >= s_exact * (1 - 1e-3)).all()  # upper bounds, up to rounding
        got, s = ivf.score(rows, n, 9)
        np.testing.assert_allclose(got, want, rtol=1e-4)  # the required tolerance; float rounding is ~1e-5
        np.testing.assert_allclose(s.reshape(n, h * w).max(1), s_exact.reshape(n, h * w).max(1), rtol=1e-4)
    assert not np.allclose(approx[1], s_exact)  # the approximation is real, and still exact where it matters
    tiny = MemoryBank(bank_rows[:50], search="ivf")
    assert not tiny.approximate  # too small for an inverted file: exact


def test_separable_blur_equals_torchvision():
    from torchvision.transforms.functional import gaussian_blur

    from tocoad_ray.bank.scoring import gaussian_blur_separable, gaussian_kernel_size

    t = torch.rand(3, 1, 96, 80) * 30
    k = gaussian_kernel_size(4.0)
    np.testing.assert_allclose(gaussian_blur_separable(t, 4.0).numpy(), gaussian_blur(t, [k, k], [4.0, 4.0]).numpy(),
                               rtol=1e-5, atol=1e-5)


def test_sq8_bank_is_4x_smaller_and_scores_like_float32(data_root, tmp_path):
    """A compact (8-bit) bank of a real category: 4x smaller file, same AUROCs (within 0.001),
    the format recorded in meta.json and checked on load; exact and IVF search on its codes."""
    import json

    from tocoad_ray.artifact import ArtifactError
    from tocoad_ray.config import load_config
    from tocoad_ray.pipeline import evaluate, fit

    from ._subset import mvtec_subset

    root = mvtec_subset(data_root / "mvtec_ad" / "bottle", tmp_path / "data", 20,
                        {"good": 4, "broken_large": 4, "contamination": 4})
    base = {"method": "patchcore", "data.image_size": 128, "data.crop_size": None, "bank.coreset_ratio": 0.5}
    res = {}
    for storage in ("float32", "sq8"):
        art = tmp_path / storage
        fit(load_config(None, {**base, "bank.storage": storage}), root, "bottle", art, progress=False,
            log=lambda m: None)
        meta = json.loads((art / "meta.json").read_text())
        assert meta["bank_format"] == storage
        res[storage] = (evaluate(art, root, "bottle", progress=False),
                        evaluate(art, root, "bottle", progress=False, search="ivf"),
                        (art / "bank.safetensors").stat().st_size)
    f32, q8 = res["float32"], res["sq8"]
    assert f32[2] / q8[2] >= 3.8  # 4x smaller bank payload (the source-image ids are shared overhead)
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert abs(f32[0][key] - q8[0][key]) <= 0.001, key
        assert abs(q8[1][key] - q8[0][key]) <= 0.002, key  # IVF over the codes
    meta = json.loads((tmp_path / "sq8" / "meta.json").read_text())
    meta["bank_format"] = "float32"
    (tmp_path / "sq8" / "meta.json").write_text(json.dumps(meta))
    from tocoad_ray.pipeline import load_detector

    with pytest.raises(ArtifactError, match="metadata says a float32 bank"):
        load_detector(tmp_path / "sq8", search="exact")


def test_feature_batches_follow_the_device_unless_set(data_root):
    """bank.batch_size null: 4 images per forward pass on a CPU, 16 on a GPU; a set value wins
    everywhere; 0 is refused by name. The loaders fit and evaluate use take it."""
    from tocoad_ray.config import ConfigError, load_config
    from tocoad_ray.data import Preprocess, load_split
    from tocoad_ray.pipeline import _loader

    cfg = load_config(None)
    assert cfg.bank.batch_size is None
    assert cfg.bank.batch_for("cpu") == 4 and cfg.bank.batch_for(torch.device("cuda", 0)) == 16
    samples = load_split(data_root / "mpdd", "metal_plate", "mvtec").train[:9]
    pre = Preprocess(cfg.data, (0.5,) * 3, (0.5,) * 3)
    loader = _loader(samples, pre, cfg, torch.device("cpu"))
    assert [len(b["image"]) for b in loader] == [4, 4, 1]
    assert _loader(samples, pre, cfg, torch.device("cuda")).batch_size == 16
    fixed = load_config(None, {"bank.batch_size": 8})
    assert fixed.bank.batch_for("cpu") == fixed.bank.batch_for("cuda") == 8
    with pytest.raises(ConfigError, match="bank.batch_size"):
        load_config(None, {"bank.batch_size": 0})
