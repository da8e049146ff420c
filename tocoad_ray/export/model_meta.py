"""What an exported model carries besides its graph: threshold, preprocessing, provenance.

Stored as one JSON string under the key ``tocoad`` (ONNX ``metadata_props``, OpenVINO ``rt_info``,
a TorchScript extra file). Parsing checks the format, so a model from another export format or
artifact format, or a file that lost its metadata, is a clear error. No torch here.
"""
from __future__ import annotations

import json
from typing import Any
from ..errors import ModelError  # noqa: F401 (re-exported)

EXPORT_FORMAT = "tocoad-ray/export/1"
ARTIFACT_FORMATS = ("tocoad-ray/artifact/1",)  # artifact formats this export format reads
META_KEY = "tocoad"
INPUT_NAME, OUTPUT_NAMES = "images", ("scores", "maps")
FORMATS = {"onnx": ".onnx", "openvino": ".xml", "torchscript": ".pt"}
OPSET = 17
REQUIRED = ("format", "artifact_format", "artifact_sha256", "version", "method", "input_size", "preprocess",
            "threshold", "score_stats", "bank_format", "bank_size", "feature_dim")


def parse_meta(text: str | None, where: str) -> dict[str, Any]:
    if not text:
        raise ModelError(f"{where}: no '{META_KEY}' metadata: not written by `tocoad export`, or the file is truncated")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelError(f"{where}: corrupted '{META_KEY}' metadata: {e}") from e
    if not isinstance(meta, dict):
        raise ModelError(f"{where}: corrupted '{META_KEY}' metadata: not a JSON object")
    if meta.get("format") != EXPORT_FORMAT:
        raise ModelError(f"{where}: export format {meta.get('format')!r}, this version reads {EXPORT_FORMAT!r}; "
                         "export the artifact again with this version")
    if meta.get("artifact_format") not in ARTIFACT_FORMATS:
        raise ModelError(f"{where}: exported from artifact format {meta.get('artifact_format')!r}, this version "
                         f"reads {list(ARTIFACT_FORMATS)}; refit and export with this version")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ModelError(f"{where}: '{META_KEY}' metadata lacks {missing}")
    return meta
