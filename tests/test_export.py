"""Exported models (tocoad export) against the torch path on real data: every method, both bank
formats, ONNX Runtime and OpenVINO; the torch-free scorer; errors for bad model files and input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tocoad_ray.cli import main
from tocoad_ray.config import load_config
from tocoad_ray.data import load_split
from tocoad_ray.export.exporter import build_graph, export_artifact
from tocoad_ray.export.model_meta import ModelError
from tocoad_ray.export.runtime import EdgeModel
from tocoad_ray.metrics import evaluate_scores
from tocoad_ray.pipeline import evaluate

from ._subset import mvtec_subset

SCORE_RTOL = 1e-4
METRIC_ATOL = 1e-3
BASE = {"data.image_size": 112, "data.crop_size": 96, "bank.coreset_ratio": 0.1, "seed": 0}
METHODS = {
    "patchcore": {},
    "tocoad": {"stage1.epochs": 1, "stage1.batch_size": 2, "stage1.max_steps_per_epoch": 1,
               "stage2.epochs": 1, "stage2.batch_size": 2, "stage2.max_steps_per_epoch": 1,
               "stage2.proj_dim": 32, "stage2.pred_hidden": 8},
    "reconpatch": {"reconpatch.epochs": 1, "reconpatch.batch_size": 128, "reconpatch.max_patches": 512},
}
CASES = [(m, f) for m in METHODS for f in ("float32", "sq8")]


@pytest.fixture(scope="module")
def root(data_root, tmp_path_factory) -> Path:
    return mvtec_subset(data_root / "mvtec_ad" / "bottle", tmp_path_factory.mktemp("bottle"), 12,
                        {"good": 4, "broken_large": 4, "contamination": 4})


@pytest.fixture(scope="module")
def test_paths(root) -> list[Path]:
    return [s.path for s in load_split(root, "bottle", "mvtec").test]


@pytest.fixture(scope="module")
def fitted(root, tmp_path_factory):
    """(method, bank format) → (artifact, evaluate's result with arrays), fitted on first use."""
    from tocoad_ray.pipeline import fit

    cache: dict[tuple[str, str], tuple[Path, dict]] = {}
    base = tmp_path_factory.mktemp("artifacts")

    def get(method: str, fmt: str):
        if (method, fmt) not in cache:
            art = base / f"{method}-{fmt}"
            cfg = load_config(None, {**BASE, **METHODS[method], "method": method, "bank.storage": fmt})
            fit(cfg, root, "bottle", art, progress=False, log=lambda s: None)
            cache[method, fmt] = art, evaluate(art, root, "bottle", progress=False, return_arrays=True)
        return cache[method, fmt]

    return get


def mismatches(ref: dict, scores: np.ndarray, maps: np.ndarray) -> list[str]:
    """How an exported model's results differ from ``tocoad evaluate``'s (empty: equal)."""
    a = ref["_arrays"]
    out = []
    rel = np.abs(scores / a["scores"] - 1.0).max()
    if not rel <= SCORE_RTOL:
        out.append(f"image scores differ by {rel:.2e} relative")
    if not np.abs(maps - a["maps"]).max() <= SCORE_RTOL * np.abs(a["maps"]).max():
        out.append(f"maps differ by {np.abs(maps - a['maps']).max():.3g} (max {np.abs(a['maps']).max():.3g})")
    got = evaluate_scores(a["labels"], scores, a["masks"], maps)
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        if not abs(got[key] - ref[key]) <= METRIC_ATOL:
            out.append(f"{key} {got[key]:.4f} vs {ref[key]:.4f}")
    return out


@pytest.mark.parametrize("method,fmt", CASES)
def test_onnx_equals_evaluate(method, fmt, fitted, test_paths, tmp_path):
    art, ref = fitted(method, fmt)
    model = tmp_path / "model.onnx"
    meta = export_artifact(art, "onnx", model)
    assert meta["method"] == method and meta["bank_format"] == fmt
    em = EdgeModel(model, threads=2)
    assert em.threshold == ref["threshold"] and em.size == 96
    scores, maps = em.score_files(test_paths, batch_size=5)  # batches of another size than evaluate's
    assert maps.shape == (12, 96, 96)
    assert mismatches(ref, scores, maps) == []
    assert ref["image_auroc"] > 0.8  # a model that sees the defects, so equal metrics mean something


@pytest.mark.parametrize("method,fmt", [("patchcore", "float32"), ("reconpatch", "sq8")])
def test_openvino_equals_evaluate(method, fmt, fitted, test_paths, tmp_path):
    art, ref = fitted(method, fmt)
    xml = tmp_path / "model.xml"
    export_artifact(art, "openvino", xml)
    onnx_model = tmp_path / "m.onnx"
    export_artifact(art, "onnx", onnx_model)
    # unfolded: the bank once, 8-bit codes kept (folding stored it decoded, once per chunk)
    assert xml.with_suffix(".bin").stat().st_size < 1.05 * onnx_model.stat().st_size
    for em in (EdgeModel(xml), EdgeModel(onnx_model, runtime="openvino")):
        assert em.runtime == "openvino"
        assert mismatches(ref, *em.score_files(test_paths)) == []


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_torchscript_equals_evaluate(fitted, test_paths, tmp_path):
    art, ref = fitted("tocoad", "float32")
    pt = tmp_path / "model.pt"
    export_artifact(art, "torchscript", pt)
    files = {"tocoad.json": ""}
    m = torch.jit.load(str(pt), _extra_files=files)
    assert json.loads(files["tocoad.json"])["method"] == "tocoad"
    x = EdgeModel(export_artifact(art, "onnx", tmp_path / "m.onnx") and tmp_path / "m.onnx").load_images(test_paths)
    with torch.no_grad():
        s, maps = m(torch.from_numpy(x))
    assert mismatches(ref, s.double().numpy(), maps.numpy()) == []


def test_sq8_bank_stays_8bit_in_the_file(fitted, tmp_path):
    import onnx

    sizes = {}
    for fmt in ("float32", "sq8"):
        art, _ = fitted("patchcore", fmt)
        sizes[fmt] = export_artifact(art, "onnx", tmp_path / f"{fmt}.onnx") and (tmp_path / f"{fmt}.onnx").stat().st_size
        meta = json.loads((art / "meta.json").read_text())
    inits = {i.name: i for i in onnx.load(str(tmp_path / "sq8.onnx")).graph.initializer}
    codes = [i for i in inits.values() if i.data_type == onnx.TensorProto.UINT8]
    assert [list(c.dims) for c in codes] == [[meta["bank_size"], meta["feature_dim"]]]
    m, d = meta["bank_size"], meta["feature_dim"]
    # 3 bytes saved per bank value, 2·d float ranges added, protobuf framing aside
    assert sizes["float32"] - sizes["sq8"] == pytest.approx(3 * m * d - 8 * d, abs=1024)


def test_comparison_catches_each_difference(fitted, test_paths):
    """The equality check fails when preprocessing, the bank, the reweighting or the blur differ."""
    from PIL import Image

    from tocoad_ray.data import read_image
    from tocoad_ray.export.preprocess import ImagePreprocess

    art, ref = fitted("patchcore", "float32")
    graph, meta = build_graph(art)
    pre = ImagePreprocess.from_dict(meta["preprocess"])
    x = np.stack([pre(read_image(p)) for p in test_paths])

    def run(g, images=x):
        with torch.no_grad():
            s, m = g(torch.from_numpy(images))
        return s.double().numpy(), m.numpy()

    assert mismatches(ref, *run(graph)) == []  # the unchanged graph is equal
    pil = np.stack([pre(np.asarray(Image.fromarray(read_image(p)).resize((112, 112), Image.BILINEAR)))
                    for p in test_paths])
    assert any("image scores" in m for m in mismatches(ref, *run(graph, pil)))  # PIL's resize instead of torch's
    graph.b = 1  # eq. 9 without its neighbourhood reweighting
    assert any("image scores" in m for m in mismatches(ref, *run(graph)))
    graph.b = meta["num_neighbors"]
    bank = graph.bank
    graph.bank = bank * 1.001  # a bank 0.1 % off
    assert any("image scores" in m for m in mismatches(ref, *run(graph)))
    graph, _ = build_graph(art)
    graph.blur, graph.blur_t = graph.blur @ graph.blur, graph.blur_t @ graph.blur_t  # a wider blur
    assert any("maps" in m for m in mismatches(ref, *run(graph)))


def test_scorer_imports_neither_torch_nor_ray(fitted, test_paths, tmp_path):
    art, ref = fitted("reconpatch", "float32")
    model = tmp_path / "model.onnx"
    export_artifact(art, "onnx", model)
    code = (
        "import json, sys\n"
        "from tocoad_ray.export.runtime import EdgeModel, predict\n"
        f"em = EdgeModel({str(model)!r})\n"
        f"paths = {[str(p) for p in test_paths]!r}\n"
        "scores, maps = em.score_files(paths)\n"
        f"predict(em, paths[:2], {str(tmp_path / 'pred')!r})\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'faiss', 'timm'))\n"
        "print(json.dumps({'scores': scores.tolist(), 'heavy': bad}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["heavy"] == []
    np.testing.assert_allclose(res["scores"], ref["_arrays"]["scores"], rtol=SCORE_RTOL)
    assert len(json.loads((tmp_path / "pred" / "predictions.json").read_text())) == 2


def test_cli_export_and_predict_model(fitted, test_paths, tmp_path, capsys):
    art, _ = fitted("patchcore", "sq8")
    model = tmp_path / "m.onnx"
    assert main(["export", "--artifact", str(art), "--format", "onnx", "--out", str(model)]) == 0
    assert "sq8 bank" in capsys.readouterr().out
    imgs = [str(test_paths[0]), str(test_paths[-1])]
    assert main(["predict", "--model", str(model), *imgs, "--out", str(tmp_path / "edge")]) == 0
    assert main(["predict", "--artifact", str(art), *imgs, "--out", str(tmp_path / "torch")]) == 0
    edge = json.loads((tmp_path / "edge" / "predictions.json").read_text())
    ref = json.loads((tmp_path / "torch" / "predictions.json").read_text())
    np.testing.assert_allclose([p["score"] for p in edge], [p["score"] for p in ref], rtol=SCORE_RTOL)
    assert [p["anomalous"] for p in edge] == [p["anomalous"] for p in ref]
    assert all(Path(p["heatmap"]).read_bytes()[:4] == b"\x89PNG" for p in edge)


def _err(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tocoad {argv[0]}: error:"), err
    return err


def test_bad_models_and_input_are_clear_errors(fitted, test_paths, tmp_path, capsys):
    import onnx

    art, _ = fitted("patchcore", "float32")
    good = tmp_path / "good.onnx"
    export_artifact(art, "onnx", good)
    data = good.read_bytes()

    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated"):
        EdgeModel(truncated)
    err = _err(capsys, ["predict", "--model", str(truncated), str(test_paths[0]), "--out", str(tmp_path / "p")])
    assert "truncated.onnx" in err
    with pytest.raises(ModelError, match="not found"):
        EdgeModel(tmp_path / "absent.onnx")

    def with_meta(name: str, edit) -> Path:
        m = onnx.load_from_string(data)
        props = {p.key: p.value for p in m.metadata_props}
        del m.metadata_props[:]
        for k, v in edit(props).items():
            e = m.metadata_props.add()
            e.key, e.value = k, v
        (tmp_path / name).write_bytes(m.SerializeToString())
        return tmp_path / name

    def meta_set(**kv):
        return lambda p: {"tocoad": json.dumps({**json.loads(p["tocoad"]), **kv})}

    with pytest.raises(ModelError, match="no 'tocoad' metadata"):
        EdgeModel(with_meta("plain.onnx", lambda p: {}))
    with pytest.raises(ModelError, match="export format 'tocoad-ray/export/0'"):
        EdgeModel(with_meta("old.onnx", meta_set(format="tocoad-ray/export/0")))
    with pytest.raises(ModelError, match="artifact format 'tocoad-ray/artifact/2'"):
        EdgeModel(with_meta("newer.onnx", meta_set(artifact_format="tocoad-ray/artifact/2")))

    em = EdgeModel(good)
    with pytest.raises(ModelError, match=r"\[batch, 3, 96, 96\], got \[2, 3, 128, 128\]"):
        em.score(np.zeros((2, 3, 128, 128), np.float32))
    with pytest.raises(ModelError, match=r"got \[1, 1, 96, 96\]"):
        em.score(np.zeros((1, 96, 96), np.float32))

    xml = tmp_path / "m.xml"
    export_artifact(art, "openvino", xml)
    b = xml.with_suffix(".bin")
    weights = bytearray(b.read_bytes())
    weights[len(weights) // 2] ^= 0xFF  # same size, one byte flipped
    b.write_bytes(bytes(weights))
    with pytest.raises(ModelError, match="sha256 mismatch"):
        EdgeModel(xml)
    b.write_bytes(bytes(weights[:-100]))
    with pytest.raises(ModelError, match="truncated"):
        EdgeModel(xml)

    err = _err(capsys, ["export", "--artifact", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.onnx")])
    assert "artifact directory not found" in err
    err = _err(capsys, ["export", "--artifact", str(art), "--format", "openvino", "--out", str(tmp_path / "x.onnx")])
    assert "ends in .xml" in err
    err = _err(capsys, ["predict", str(test_paths[0]), "--out", str(tmp_path / "p")])
    assert "exactly one of --artifact" in err


@pytest.mark.parametrize("keep_aspect", [False, True])
def test_numpy_preprocess_equals_torch(keep_aspect):
    """The edge scorer's resize + crop + normalisation equals the artifact's torch preprocessing on
    any image size (down- and upscaling, odd sizes, aspect kept or squashed)."""
    from tocoad_ray.config import DataConfig
    from tocoad_ray.data import Preprocess
    from tocoad_ray.export.preprocess import ImagePreprocess

    rng = np.random.default_rng(0)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for h, w in [(900, 900), (300, 517), (61, 97), (112, 112), (40, 40)]:
        for image_size, crop in [(112, 96), (64, None), (256, 224)]:
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            cfg = DataConfig(image_size=image_size, crop_size=crop, keep_aspect=keep_aspect)
            ref = Preprocess(cfg, mean, std).image(img).numpy()
            got = ImagePreprocess(image_size, crop, keep_aspect, mean, std)(img)
            assert got.shape == ref.shape and got.dtype == np.float32
            assert np.abs(got - ref).max() < 5e-6, (h, w, image_size, crop)
    gray = rng.integers(0, 256, (50, 70), dtype=np.uint8)
    assert ImagePreprocess(64, None, keep_aspect, mean, std)(gray).shape == (3, 64, 64)
    with pytest.raises(ValueError, match="HxWx3"):
        ImagePreprocess(64, None, keep_aspect, mean, std)(np.zeros((5, 5, 4), np.uint8))
