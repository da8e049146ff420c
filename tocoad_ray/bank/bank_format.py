"""The bank file's arrays checked against meta.json, in numpy only (the scoring service's registry
reads banks without torch)."""
from __future__ import annotations

import numpy as np


def bank_arrays(tensors: dict[str, np.ndarray], fmt: str, dim: int, where: str):
    """(bank [M, d] float32 or sq8 codes, source_image or None, SQ8 or None) of a bank file's
    tensors; ``fmt`` (float32 | sq8) and ``dim`` come from meta.json and must agree with the file
    (ValueError naming ``where`` otherwise)."""
    from .quantize import SQ8

    key = {"float32": "bank", "sq8": "bank_codes"}.get(fmt)
    if key is None:
        raise ValueError(f"{where}: unknown bank format {fmt!r} (expected float32 or sq8)")
    if key not in tensors:
        raise ValueError(f"{where}: metadata says a {fmt} bank but the file holds {sorted(tensors)}")
    arr = tensors[key]
    want = np.uint8 if fmt == "sq8" else np.float32
    if arr.ndim != 2 or arr.dtype != want:
        raise ValueError(f"{where}: {key} is {arr.dtype} {arr.shape}, metadata says a {fmt} [M, d] bank")
    if arr.shape[1] != dim:
        raise ValueError(f"{where}: bank has {arr.shape[1]} dims, metadata says {dim}")
    sq = None
    if fmt == "sq8":
        trained = tensors.get("sq8_trained")
        if trained is None or trained.shape != (2 * dim,):
            raise ValueError(f"{where}: an sq8 bank needs sq8_trained of shape ({2 * dim},)")
        sq = SQ8(np.asarray(trained, dtype=np.float32))
    return arr, tensors.get("source_image"), sq
