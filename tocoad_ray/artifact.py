"""Artifact directory: memory bank + metadata (+ fine-tuned weights), saved atomically and verified.

Layout::

    ARTIFACT/
      meta.json              format, config, backbone id + weights sha256, score statistics,
                             threshold, and the sha256 of every other file (written last)
      config.yaml            the config the fit ran with
      bank.safetensors       bank [M, d] float32, source_image [M] int32
      backbone.safetensors   fine-tuned F (method tocoad)
      adapter.safetensors    ReConPatch linear modulation g (method reconpatch)

Every file is written to a temporary name and moved into place with ``os.replace``; meta.json
goes last, so a crash leaves either the old artifact or a checksum mismatch, never a silent mix.
Operator feedback adds later versions beside this one (``versions/``, ``current.json``; see
``artifact_versions``); this folder stays version 1, and readers load ``current_dir(folder)``.
Nothing is unpickled: arrays are safetensors, metadata JSON/YAML.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .fileio import atomic_write_bytes, sha256_file  # re-exported: imported from here elsewhere
from .errors import ArtifactError  # noqa: F401 (re-exported)

FORMAT = "tocoad-ray/artifact/1"


def atomic_save_tensors(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """Save numpy arrays or torch tensors as safetensors, atomically."""
    import torch
    from safetensors.torch import save

    t = {k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v.detach().cpu().contiguous())
         for k, v in tensors.items()}
    atomic_write_bytes(path, save(t, metadata=metadata))


def load_tensors(path: str | Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise ArtifactError(f"cannot read {path}: {e}") from e


def write_meta(artifact: str | Path, meta: dict[str, Any]) -> None:
    """Record checksums of every file listed in meta['files'] and write meta.json last."""
    artifact = Path(artifact)
    meta = dict(meta)
    meta["format"] = FORMAT
    meta["files"] = {name: sha256_file(artifact / name) for name in meta.get("files", {})}
    atomic_write_bytes(artifact / "meta.json", json.dumps(meta, indent=2, sort_keys=False).encode())


def read_meta(artifact: str | Path, verify: bool = True) -> dict[str, Any]:
    artifact = Path(artifact)
    if not artifact.is_dir():
        raise ArtifactError(f"artifact directory not found: {artifact}")
    mp = artifact / "meta.json"
    if not mp.is_file():
        raise ArtifactError(f"{artifact} is not an artifact: meta.json is missing (did the fit finish?)")
    try:
        meta = json.loads(mp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mp} is corrupted: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{mp}: unknown artifact format {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT}")
    if verify:
        for name, digest in meta.get("files", {}).items():
            p = artifact / name
            if not p.is_file():
                raise ArtifactError(f"artifact file missing: {p}")
            if sha256_file(p) != digest:
                raise ArtifactError(f"artifact file corrupted (sha256 mismatch): {p}")
    return meta
