"""Tests for the anomaly generator G (tocoad_ray.synth)."""
from __future__ import annotations

import glob
import pickle

import numpy as np
import pytest
from PIL import Image

from tocoad_ray.synth import (GENERATORS, AnomalyGenerator, TextureSource, augment_texture, grid_size,
                              perlin_mask, perlin_noise, poisson_blend, rotate_base, save_grid)

BOTTLE = "/work/shared/data/mvtec_ad/bottle/train/good"
TILE = "/work/shared/data/magnetic_tile/mt/train/good"
KINDS = sorted(GENERATORS)


def _load(pattern, size, n=4, mode="RGB"):
    files = sorted(glob.glob(pattern))[:n]
    if files:
        return [np.asarray(Image.open(f).convert(mode).resize(size, Image.BILINEAR)) for f in files]
    rng = np.random.default_rng(123)  # fallback when the shared data is absent
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def bottles():
    return _load(f"{BOTTLE}/*.png", (128, 96))  # W=128, H=96: non-square


@pytest.fixture(scope="module")
def small():
    return _load(f"{BOTTLE}/*.png", (64, 64))


@pytest.fixture(scope="module")
def tiles():
    return _load(f"{TILE}/*.jpg", (80, 48), mode="L")  # grayscale H=48, W=80


def _gen(kind, images, **kw):
    return AnomalyGenerator(kind, other_images=images if kind == "nsa" else None, **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_mask_matches_altered_pixels(kind, bottles):
    gen = _gen(kind, bottles, normal_prob=0.0)
    rng = np.random.default_rng(0)
    changed_in_mask = masked = 0
    for i in range(12):
        out, mask, base = gen.generate(bottles[i % len(bottles)], rng)
        assert out.shape == base.shape == bottles[0].shape and out.dtype == np.uint8
        assert mask.shape == out.shape[:2] and mask.dtype == bool
        diff = (out != base).any(axis=2)
        assert not (diff & ~mask).any(), "pixel changed outside the mask"
        assert mask.any(), "anomalous sample with empty mask"
        if kind == "nsa":
            assert np.array_equal(mask, diff)
        changed_in_mask += int(diff[mask].sum())
        masked += int(mask.sum())
    if kind == "perlin":
        assert changed_in_mask / masked > 0.8


@pytest.mark.parametrize("kind", KINDS)
def test_reproducible(kind, small):
    gen = _gen(kind, small, normal_prob=0.0)
    a = [gen(small[0], np.random.default_rng(7)) for _ in range(2)]
    assert a[0][0].tobytes() == a[1][0].tobytes() and np.array_equal(a[0][1], a[1][1])
    # a pickled copy (as shipped to Ray workers) gives the same bytes
    b = pickle.loads(pickle.dumps(gen))(small[0], np.random.default_rng(7))
    assert b[0].tobytes() == a[0][0].tobytes()
    c = gen(small[0], np.random.default_rng(8))
    assert c[0].tobytes() != a[0][0].tobytes() or not np.array_equal(c[1], a[0][1])


@pytest.mark.parametrize("kind", KINDS)
def test_about_half_normal(kind, small):
    gen = _gen(kind, small, normal_prob=0.5)
    rng = np.random.default_rng(1)
    n = 200
    normal = 0
    for i in range(n):
        out, mask, base = gen.generate(small[i % len(small)], rng)
        if not mask.any():
            normal += 1
            assert np.array_equal(out, base)
    assert 68 <= normal <= 132  # 100 +- 4.5 sigma for Binomial(200, 0.5)


@pytest.mark.parametrize("kind", KINDS)
def test_grayscale_non_square(kind, tiles):
    gen = _gen(kind, tiles, normal_prob=0.0)
    rng = np.random.default_rng(3)
    for img in tiles[:3]:
        out, mask, base = gen.generate(img, rng)  # 2-D grey in -> 2-D grey out
        assert out.shape == img.shape == base.shape and out.dtype == np.uint8
        assert mask.shape == img.shape and mask.any()
        assert not ((out != base) & ~mask).any()
        rgb = np.repeat(img[..., None], 3, axis=2)  # grey stored as RGB stays grey
        out3, mask3 = gen(rgb, rng)
        assert out3.shape == rgb.shape and out3.dtype == np.uint8 and mask3.shape == img.shape
        assert np.array_equal(out3[..., 0], out3[..., 1]) and np.array_equal(out3[..., 1], out3[..., 2])


def test_texture_folder(tmp_path, small):
    rng = np.random.default_rng(0)
    for cls in ("banded", "dotted"):
        d = tmp_path / "images" / cls
        d.mkdir(parents=True)
        for j in range(2):
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(d / f"{cls}_{j}.png")
    src = TextureSource(str(tmp_path))
    assert len(src) == 4 and not src.procedural
    tex = src.sample(np.random.default_rng(0), (64, 32))
    assert tex.shape == (64, 32, 3) and tex.dtype == np.uint8
    aug = augment_texture(tex, np.random.default_rng(0))
    assert aug.shape == tex.shape and aug.dtype == np.uint8
    gen = AnomalyGenerator("perlin", texture_dir=str(tmp_path), normal_prob=0.0)
    o1, m1 = gen(small[0], np.random.default_rng(5))
    o2, m2 = gen(small[0], np.random.default_rng(5))
    assert m1.any() and o1.tobytes() == o2.tobytes()
    with pytest.raises(FileNotFoundError):
        TextureSource(str(tmp_path / "missing"))


def test_other_images_as_textures(small):
    src = TextureSource(images=small, procedural=False)
    tex = src.sample(np.random.default_rng(0), (32, 48))
    assert tex.shape == (32, 48, 3)


def test_perlin_noise_and_mask():
    rng = np.random.default_rng(0)
    n = perlin_noise((50, 70), (4, 3), rng)  # not divisible: padded + cropped
    assert n.shape == (50, 70) and np.isfinite(n).all() and np.abs(n).max() < 1.5 and n.std() > 0.05
    for shape in [(256, 256), (20, 33), (8, 8)]:
        for _ in range(5):
            m = perlin_mask(shape, rng)
            assert m.shape == shape and m.dtype == bool and m.any()


def test_rotate_base_shapes():
    rng = np.random.default_rng(0)
    sq = np.zeros((32, 32, 3), np.uint8)
    ns = np.zeros((20, 36, 3), np.uint8)
    for _ in range(8):
        assert rotate_base(sq, rng).shape == sq.shape
        assert rotate_base(ns, rng).shape == ns.shape


def test_poisson_blend():
    rng = np.random.default_rng(0)
    tgt = rng.integers(0, 256, (20, 30, 3)).astype(np.uint8)
    src = rng.integers(0, 256, (20, 30, 3)).astype(np.uint8)
    out = poisson_blend(src, tgt)
    assert np.array_equal(out[0], tgt[0]) and np.array_equal(out[:, -1], tgt[:, -1])
    np.testing.assert_allclose(poisson_blend(tgt, tgt), tgt, atol=1e-3)
    # interior gradients (Laplacian) follow the source
    lap = lambda a: (4 * a[1:-1, 1:-1] - a[:-2, 1:-1] - a[2:, 1:-1] - a[1:-1, :-2] - a[1:-1, 2:])
    np.testing.assert_allclose(lap(out)[1:-1, 1:-1], lap(src.astype(np.float32))[1:-1, 1:-1], atol=1e-2)


def test_save_grid(tmp_path, small):
    gen = AnomalyGenerator("perlin", normal_prob=0.0)
    rng = np.random.default_rng(0)
    samples = [gen(small[i % len(small)], rng) for i in range(5)]
    path = tmp_path / "sub" / "grid.png"
    save_grid(samples, str(path), cols=3)
    with Image.open(path) as im:
        im.load()
        assert im.size == grid_size(samples, cols=3) == (4 + 3 * 68, 4 + 2 * (128 + 4))
        arr = np.asarray(im.convert("RGB"))
    assert (arr == [255, 0, 0]).all(axis=2).any()  # mask outlines drawn
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temp files left


def test_unknown_kind():
    with pytest.raises(ValueError):
        AnomalyGenerator("nope")
