"""Data layer on real data (skipped when absent) and on small trees built in tmp_path."""
from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tocoad_ray.config import DataConfig
from tocoad_ray.data import (
    DataError, ImageDataset, Preprocess, Sample, decode_image_bytes, has_masks, load_split, read_btad,
    read_elpv, read_folder, read_image, read_mask, read_mvtec, read_visa,
)


@pytest.fixture(scope="session")
def bottle(data_root):
    return read_mvtec(data_root / "mvtec_ad", "bottle")


@pytest.fixture(scope="session")
def tile(data_root):
    return read_mvtec(data_root / "magnetic_tile", "mt")


def _png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


# ---- real data -----------------------------------------------------------------------------------

def test_bottle_counts(bottle):
    assert len(bottle.train) == 209 and all(s.label == 0 and s.mask_path is None for s in bottle.train)
    good = [s for s in bottle.test if s.label == 0]
    bad = [s for s in bottle.test if s.label == 1]
    assert len(good) == 20 and len(bad) == 63
    assert all(s.mask_path is not None and s.mask_path.is_file() for s in bad)
    assert {s.defect_type for s in bad} == {"broken_large", "broken_small", "contamination"}
    assert has_masks(bottle.test) and not has_masks(bottle.train)
    assert [s.path for s in bottle.train] == sorted(s.path for s in bottle.train)
    assert read_mvtec(bottle.train[0].path.parents[3], "bottle") == bottle  # deterministic


def test_load_split_dispatch(data_root, bottle):
    assert load_split(data_root / "mvtec_ad", "bottle") == bottle
    with pytest.raises(DataError, match="mvtec, visa, btad, folder, elpv"):
        load_split(data_root / "mvtec_ad", "bottle", layout="coco")


def test_magnetic_tile_mixed_formats_and_nonsquare(tile):
    assert len(tile.train) == 762 and len(tile.test) == 190 + 392
    bad = [s for s in tile.test if s.label == 1]
    assert all(s.mask_path is not None for s in bad)
    suffixes = {s.path.suffix for s in tile.test}
    assert suffixes == {".jpg", ".png"}
    pick = [next(s for s in bad if s.path.suffix == sfx and s.defect_type == t)
            for sfx in (".jpg", ".png") for t in ("blowhole", "crack")]
    # No crop here: ~10 % of magnetic-tile defects lie wholly outside the paper's 224 centre crop.
    for keep_aspect, crop in ((False, None), (True, 224)):
        ds = ImageDataset(pick, Preprocess(DataConfig(keep_aspect=keep_aspect, crop_size=crop)))
        size = crop or 256
        for i in range(len(ds)):
            raw = read_image(pick[i].path)
            assert raw.dtype == np.uint8 and raw.ndim == 3 and raw.shape[2] == 3
            item = ds[i]
            assert item["image"].shape == (3, size, size) and item["image"].dtype == torch.float32
            assert item["mask"].shape == (1, size, size)
            assert item["label"] == 1 and item["index"] == i
            assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
            if crop is None:
                assert item["mask"].sum() > 0, pick[i].path
    shapes = {read_image(s.path).shape[:2] for s in pick}
    assert any(h != w for h, w in shapes)


def test_mvtec_missing_category_and_bad_trees(tmp_path, data_root):
    with pytest.raises(DataError, match="nope"):
        read_mvtec(data_root / "mvtec_ad", "nope")
    (tmp_path / "cat" / "train" / "good").mkdir(parents=True)
    (tmp_path / "cat" / "test").mkdir()
    (tmp_path / "cat" / "train" / "good" / "._x.png").write_bytes(b"junk")  # AppleDouble, ignored
    with pytest.raises(DataError, match=str(tmp_path / "cat" / "train" / "good")):
        read_mvtec(tmp_path, "cat")
    (tmp_path / "cat2" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match="training folder"):
        read_mvtec(tmp_path, "cat2")


def test_mvtec_missing_mask_and_plain_mask_name(tmp_path, bottle):
    base = tmp_path / "c"
    src_bad = [s for s in bottle.test if s.label == 1][:2]
    (base / "train" / "good").mkdir(parents=True)
    shutil.copy(bottle.train[0].path, base / "train" / "good" / "000.PNG")  # upper-case extension
    (base / "test" / "scratch").mkdir(parents=True)
    (base / "ground_truth" / "scratch").mkdir(parents=True)
    shutil.copy(src_bad[0].path, base / "test" / "scratch" / "a.png")
    shutil.copy(src_bad[1].path, base / "test" / "scratch" / "b.png")
    shutil.copy(src_bad[0].mask_path, base / "ground_truth" / "scratch" / "a.png")  # <stem>.png accepted
    split = read_mvtec(tmp_path, "c")
    assert len(split.train) == 1
    assert [(s.path.name, s.mask_path and s.mask_path.name) for s in split.test] == [("a.png", "a.png"), ("b.png", None)]
    item = ImageDataset(split.test, Preprocess(DataConfig()))[1]
    assert item["mask"].sum() == 0  # missing mask -> empty mask
    shutil.rmtree(base / "test")
    with pytest.raises(DataError, match="test folder"):
        read_mvtec(tmp_path, "c")


def test_elpv_split_deterministic_and_disjoint():
    a = read_elpv(category="mono")
    b = load_split(None, "mono", layout="elpv")
    assert a == b
    train, test = {s.path for s in a.train}, {s.path for s in a.test}
    assert not train & test
    n_normal = 588
    assert len(a.train) + sum(s.label == 0 for s in a.test) == n_normal
    assert sum(s.label == 0 for s in a.test) == round(0.2 * n_normal)
    assert sum(s.label == 1 for s in a.test) == 313
    assert all(s.mask_path is None for s in a.test) and not has_masks(a.test)
    assert read_elpv(category="mono", seed=1).train != a.train
    poly = read_elpv(category="poly", test_fraction=0.5)
    assert len(poly.train) == 460 and sum(s.label == 1 for s in poly.test) == 402
    item = ImageDataset(a.test[-1:], Preprocess(DataConfig()))[0]
    assert item["image"].shape == (3, 224, 224) and item["label"] == 1
    with pytest.raises(DataError, match="mono"):
        read_elpv(category="cdte")


# ---- decoding ------------------------------------------------------------------------------------

def test_truncated_and_non_image_files(tmp_path, bottle):
    data = bottle.train[0].path.read_bytes()
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="trunc.png"):
        read_image(trunc)
    txt = tmp_path / "notes.png"
    txt.write_bytes(b"this is not an image at all")
    with pytest.raises(DataError, match="notes.png"):
        read_image(txt)
    with pytest.raises(DataError, match="missing.png"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(DataError, match="empty image"):
        decode_image_bytes(b"")
    with pytest.raises(DataError):
        decode_image_bytes(data[: len(data) // 2])
    with pytest.raises(DataError):
        decode_image_bytes(b"GIF89a garbage")
    assert decode_image_bytes(data).shape == (256, 256, 3)


def test_decompression_bomb_guard():
    big = _png_bytes(Image.new("L", (400, 300)))
    assert decode_image_bytes(big).shape == (300, 400, 3)
    with pytest.raises(DataError, match="exceeds"):
        decode_image_bytes(big, max_pixels=100_000)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "I;16", "I", "1", "RGB", "CMYK"])
def test_modes_decode_to_rgb_uint8(tmp_path, mode):
    h, w = 17, 29
    if mode in ("I;16", "I"):
        arr = np.linspace(0, 65535, h * w).reshape(h, w).astype(np.uint16 if mode == "I;16" else np.int32)
        img = Image.fromarray(arr) if mode == "I;16" else Image.fromarray(arr).convert("I")
    else:
        img = Image.new(mode, (w, h), color=(1 if mode == "1" else None))
        if mode == "RGBA":
            img = Image.new("RGBA", (w, h), (200, 100, 50, 0))
            img.putpixel((0, 0), (200, 100, 50, 255))
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I" else "PNG")
    path = tmp_path / f"x.{fmt.lower()}"
    img.save(path, format=fmt)
    if mode in ("I;16", "I"):
        assert Image.open(path).mode == mode
    out = read_image(path)
    assert out.shape == (h, w, 3) and out.dtype == np.uint8
    assert np.array_equal(out, decode_image_bytes(path.read_bytes()))
    if mode in ("I;16", "I"):
        assert out.min() == 0 and out.max() == 255
    if mode == "RGBA":  # composited on black
        assert tuple(out[0, 0]) == (200, 100, 50) and out[1:, 1:].max() == 0


def test_mask_values_and_wrong_size(tmp_path, bottle):
    bad = next(s for s in bottle.test if s.label == 1)
    m = read_mask(bad.mask_path)
    assert m.dtype == bool and m.shape == (256, 256) and 0 < m.sum() < m.size
    small = tmp_path / "small_mask.png"
    Image.fromarray((m[:100, :120] * 255).astype(np.uint8)).save(small)
    ds = ImageDataset([Sample(bad.path, 1, small, "x")], Preprocess(DataConfig()))
    with pytest.raises(DataError, match="small_mask.png"):
        ds[0]


# ---- geometry ------------------------------------------------------------------------------------

@pytest.mark.parametrize("keep_aspect,crop", [(False, 224), (True, 224), (True, None), (False, None)])
def test_mask_and_image_share_geometry(keep_aspect, crop):
    rng = np.random.default_rng(0)
    h, w = 183, 311  # non-square, odd sizes
    mask = np.zeros((h, w), bool)
    mask[40:120, 200:260] = True
    mask[rng.integers(0, h, 50), rng.integers(0, w, 50)] = True
    rgb = np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2)
    pre = Preprocess(DataConfig(keep_aspect=keep_aspect, crop_size=crop), mean=(0, 0, 0), std=(1, 1, 1))
    img, msk = pre.image(rgb), pre.mask(mask, (h, w))
    size = crop or 256
    assert img.shape == (3, size, size) and msk.shape == (1, size, size)
    big = msk[0] > 0
    # Interior of the rectangle: image bright where mask is set (blob edges may blur by a pixel)
    agree = ((img[0] > 0.5) == big).float().mean()
    assert agree > 0.97
    assert np.array_equal(pre.denormalize(img)[..., 0] > 127, (img[0] > 0.5).numpy())
    with pytest.raises(DataError, match="m.png"):
        pre.mask(mask, (h + 1, w), "m.png")


def test_denormalize_roundtrip():
    rgb = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    pre = Preprocess(DataConfig(crop_size=None))
    assert np.abs(pre.denormalize(pre.image(rgb)).astype(int) - rgb).max() <= 1


# ---- other layouts on synthetic trees built from real images ---------------------------------------

def test_visa_reader(tmp_path, bottle):
    bad = [s for s in bottle.test if s.label == 1][:2]
    (tmp_path / "candle" / "Data" / "Images" / "Normal").mkdir(parents=True)
    (tmp_path / "candle" / "Data" / "Images" / "Anomaly").mkdir(parents=True)
    (tmp_path / "candle" / "Data" / "Masks" / "Anomaly").mkdir(parents=True)
    rows = ["object,split,label,image,mask"]
    for i, s in enumerate(bottle.train[:3]):
        rel = f"candle/Data/Images/Normal/{i:04d}.JPG"
        Image.open(s.path).convert("RGB").save(tmp_path / rel, format="JPEG")
        rows.append(f"candle,{'train' if i < 2 else 'test'},normal,{rel},")
    for i, s in enumerate(bad):
        rel, mrel = f"candle/Data/Images/Anomaly/{i:03d}.JPG", f"candle/Data/Masks/Anomaly/{i:03d}.png"
        Image.open(s.path).convert("RGB").save(tmp_path / rel, format="JPEG")
        shutil.copy(s.mask_path, tmp_path / mrel)
        rows.append(f"candle,test,anomaly,{rel},{mrel}")
    rows.append("pcb1,train,normal,pcb1/x.JPG,")
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    split = read_visa(tmp_path, "candle")
    assert len(split.train) == 2 and len(split.test) == 3
    assert [s.label for s in split.test] == [1, 1, 0] and has_masks(split.test)
    assert load_split(tmp_path, "candle", "visa") == split
    item = ImageDataset(split.test, Preprocess(DataConfig()))[0]
    assert item["mask"].sum() > 0
    with pytest.raises(DataError, match="pcb1"):
        read_visa(tmp_path, "capsules")
    with pytest.raises(DataError, match="x.JPG"):
        read_visa(tmp_path, "pcb1")


def test_btad_reader(tmp_path, bottle):
    bad = [s for s in bottle.test if s.label == 1][:2]
    base = tmp_path / "01"
    for d in ("train/ok", "test/ok", "test/ko", "ground_truth/ko"):
        (base / d).mkdir(parents=True)
    for i, s in enumerate(bottle.train[:2]):
        Image.open(s.path).save(base / "train" / "ok" / f"{i:04d}.bmp")
    shutil.copy(bottle.train[2].path, base / "test" / "ok" / "0000.png")
    for i, s in enumerate(bad):
        Image.open(s.path).save(base / "test" / "ko" / f"{i:04d}.bmp")
    Image.open(bad[0].mask_path).save(base / "ground_truth" / "ko" / "0000.bmp")
    split = read_btad(tmp_path, "01")
    assert len(split.train) == 2 and len(split.test) == 3
    assert [(s.label, s.defect_type, s.mask_path and s.mask_path.name) for s in split.test] == [
        (0, "good", None), (1, "ko", "0000.bmp"), (1, "ko", None)]
    assert ImageDataset(split.test, Preprocess(DataConfig()))[1]["mask"].sum() > 0
    (tmp_path / "02" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="ok"):
        read_btad(tmp_path, "02")


def test_folder_reader(tmp_path, bottle):
    bad = [s for s in bottle.test if s.label == 1][:2]
    base = tmp_path / "widget"
    (base / "train" / "batch1").mkdir(parents=True)
    (base / "test" / "good").mkdir(parents=True)
    (base / "test" / "dent").mkdir(parents=True)
    (base / "masks").mkdir()
    shutil.copy(bottle.train[0].path, base / "train" / "a.png")
    shutil.copy(bottle.train[1].path, base / "train" / "batch1" / "b.png")
    (base / "train" / "readme.txt").write_text("not an image")
    shutil.copy(bottle.train[2].path, base / "test" / "good" / "g.png")
    shutil.copy(bad[0].path, base / "test" / "dent" / "d1.png")
    shutil.copy(bad[1].path, base / "test" / "dent" / "d2.png")
    shutil.copy(bad[0].mask_path, base / "masks" / "d1.png")
    split = read_folder(tmp_path, "widget")
    assert [s.path.name for s in split.train] == ["a.png", "b.png"]
    assert [(s.path.name, s.label, s.defect_type, s.mask_path and s.mask_path.name) for s in split.test] == [
        ("d1.png", 1, "dent", "d1.png"), ("d2.png", 1, "dent", None), ("g.png", 0, "good", None)]
    assert load_split(tmp_path, "widget", "folder") == split
    (base / "test" / "scratch").mkdir()
    shutil.copy(bad[1].path, base / "test" / "scratch" / "d1.png")
    with pytest.raises(DataError, match="d1.png"):
        read_folder(tmp_path, "widget")
