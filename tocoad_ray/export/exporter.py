"""``tocoad export``: an artifact → one ONNX (opset 17), OpenVINO IR or TorchScript model.

The input is a batch of *preprocessed* images [B, 3, S, S] (the artifact's resize, crop and
normalisation, recorded in the metadata): camera frames come in any size and torch's antialiased
resize depends on it, so resizing in the graph would need one graph per resolution and ONNX's
Resize does not reproduce torch's antialias filter. ``export.preprocess`` does it in numpy, equal
to the artifact's preprocessing.

ONNX goes through torch's TorchScript-based exporter (``dynamo=False``): it turns the matrix
products, ReduceMin/ArgMin, TopK and Gather of the search into plain ONNX ops without onnxscript;
constant folding is off so an 8-bit bank stays 8-bit in the file (runtimes fold the decoding when
they load it). OpenVINO IR is that ONNX graph read by OpenVINO and serialised unfolded (f32, 8-bit codes kept).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..artifact import ArtifactError, read_meta
from ..fileio import atomic_write, sha256_file
from .graph import ScoringGraph
from .model_meta import EXPORT_FORMAT, FORMATS, INPUT_NAME, META_KEY, OPSET, OUTPUT_NAMES, ModelError


def build_graph(artifact: str | Path, chunk: int = 8192) -> tuple[ScoringGraph, dict[str, Any]]:
    """The artifact's scoring graph (verified like ``load_detector``) and the model metadata."""
    from ..artifact_versions import current_dir, current_version
    from ..pipeline import load_detector

    artifact = Path(artifact)
    det = load_detector(artifact, device="cpu", search="exact")
    ext = det.model.extractor.to(memory_format=torch.contiguous_format)
    bank = det.bank
    sq = None if bank.sq8 is None else torch.from_numpy(bank.sq8.trained.copy())
    size = int(det.meta["input_size"])
    graph = ScoringGraph(ext.body, ext._order, det.cfg.bank.patch_size, det.model.adapter,
                         torch.from_numpy(bank.bank.copy()), sq, det.cfg.bank.num_neighbors,
                         det.cfg.bank.blur_sigma, size, chunk=chunk)
    m, d = det.meta, det.cfg.data
    meta = {
        "format": EXPORT_FORMAT,
        "artifact_format": m["format"],
        "artifact_sha256": sha256_file(current_dir(artifact) / "meta.json"),  # the version exported
        "artifact_version": current_version(artifact),
        "version": __version__,
        "method": m["method"],
        "category": m.get("category"),
        "backbone": m["backbone"]["name"],
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, size, size], "dtype": "float32",
                  "what": "preprocessed images (resize, centre crop, normalise as 'preprocess')"},
        "outputs": {"scores": "image score, eq. 9 [batch]", "maps": f"anomaly map [batch, {size}, {size}]"},
        "input_size": size,
        "preprocess": {"image_size": d.image_size, "crop_size": d.crop_size, "keep_aspect": d.keep_aspect,
                       "mean": list(ext.mean), "std": list(ext.std), "resize": "bilinear, antialiased (torch)"},
        "threshold": float(m["threshold"]),
        "score_stats": m["score_stats"],
        "bank_format": m.get("bank_format", "float32"),
        "bank_size": int(m["bank_size"]),
        "feature_dim": int(m["feature_dim"]),
        "num_neighbors": det.cfg.bank.num_neighbors,
        "blur_sigma": det.cfg.bank.blur_sigma,
        "grid": m["grid"],
        "opset": OPSET,
    }
    return graph.eval(), meta


def _onnx_bytes(graph: ScoringGraph, meta: dict[str, Any], tmp: Path) -> bytes:
    try:
        import onnx
    except ImportError as e:
        raise ModelError("exporting to ONNX or OpenVINO needs the onnx package: pip install 'tocoad-ray[export]'") from e
    size = meta["input_size"]
    example = torch.zeros(2, 3, size, size)  # batch 2, so the batch axis is not specialised to 1
    dyn = {INPUT_NAME: {0: "batch"}, **{o: {0: "batch"} for o in OUTPUT_NAMES}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation and tracer notes
        torch.onnx.export(graph, (example,), str(tmp), dynamo=False, opset_version=OPSET, input_names=[INPUT_NAME],
                          output_names=list(OUTPUT_NAMES), dynamic_axes=dyn, do_constant_folding=False)
    model = onnx.load(str(tmp))
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)
    model.producer_name, model.producer_version = "tocoad-ray", __version__
    return model.SerializeToString()


def _save_openvino(onnx_path: Path, meta: dict[str, Any], out: Path) -> None:
    try:
        import openvino as ov
    except ImportError as e:
        raise ModelError("exporting to OpenVINO needs the openvino package: pip install 'tocoad-ray[export]'") from e
    # read_model + serialize keeps the graph as exported: convert_model / save_model fold constants,
    # which decodes an 8-bit bank to float32 and stores the bank once per chunk (4x the file)
    model = ov.Core().read_model(str(onnx_path))
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as td:
        xml = Path(td) / out.name
        ov.serialize(model, str(xml), str(xml.with_suffix(".bin")))
        # the .xml records the .bin's digest, so a truncated or swapped .bin is caught at load
        meta = {**meta, "weights_file": out.with_suffix(".bin").name, "weights_sha256": sha256_file(xml.with_suffix(".bin"))}
        model.set_rt_info(json.dumps(meta), [META_KEY])
        ov.serialize(model, str(xml), str(xml.with_suffix(".bin")))
        if sha256_file(xml.with_suffix(".bin")) != meta["weights_sha256"]:
            raise ModelError("OpenVINO wrote different weights on a second save; cannot record their digest")
        os.replace(xml.with_suffix(".bin"), out.with_suffix(".bin"))  # weights first, the .xml that names them last
        os.replace(xml, out)


def export_artifact(artifact: str | Path, fmt: str, out: str | Path, chunk: int = 8192) -> dict[str, Any]:
    """Write the artifact's scoring model to ``out`` (atomically); returns the model metadata."""
    if fmt not in FORMATS:
        raise ModelError(f"unknown export format {fmt!r}; choose one of {sorted(FORMATS)}")
    if chunk < 1:
        raise ModelError(f"chunk must be at least 1 bank row, got {chunk}")
    out = Path(out)
    if out.suffix != FORMATS[fmt]:
        raise ModelError(f"--out {out}: a {fmt} model file ends in {FORMATS[fmt]}")
    try:
        read_meta(artifact)
    except ArtifactError as e:
        raise ModelError(f"cannot export: {e}") from e
    graph, meta = build_graph(artifact, chunk=chunk)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torchscript":
        size = meta["input_size"]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(graph, torch.zeros(2, 3, size, size))
            atomic_write(out, lambda p: torch.jit.save(traced, str(p), _extra_files={f"{META_KEY}.json": json.dumps(meta)}))
        return meta
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as td:
        tmp = Path(td) / "graph.onnx"
        data = _onnx_bytes(graph, meta, tmp)
        if fmt == "onnx":
            atomic_write(out, lambda p: p.write_bytes(data))
        else:
            tmp.write_bytes(data)
            _save_openvino(tmp, meta, out)
    meta["sha256"] = hashlib.sha256(data).hexdigest() if fmt == "onnx" else None
    return meta
