"""What the registry puts in Ray's object store for each published version, and what a replica
keeps of it: the verified bytes of the version's files (never a path to re-read), bounded so old
versions drop out. Plain Python and hashlib: the registry imports this without torch."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from tocoad_ray.errors import ArtifactError

MODEL_FILES = ("backbone.safetensors", "adapter.safetensors")  # the artifact files that hold weights


def backbone_id(artifact: str, sha: str) -> str:
    """The Backbone deployment's multiplex id of an artifact version."""
    return f"{artifact}|{sha}"


def remember(sources: dict[str, Any], mid: str, value: Any, limit: int = 64) -> None:
    """``sources[mid] = value``, dropping the oldest entry past ``limit``."""
    sources[mid] = value
    if len(sources) > limit:
        sources.pop(next(iter(sources)))


def model_source(artifact: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The model side of an artifact version as bytes checked against meta.json's sha256 (read
    once: a file replaced after the check cannot slip in). The Backbone replica builds F (+ the
    ReConPatch adapter) from it and checks the weights digest the bank was built with."""
    files = {}
    for name in MODEL_FILES:
        digest = meta.get("files", {}).get(name)
        if digest is None:
            continue
        p = Path(artifact) / name
        try:
            data = p.read_bytes()
        except OSError as e:
            raise ArtifactError(f"artifact file missing: {p}") from e
        if hashlib.sha256(data).hexdigest() != digest:
            raise ArtifactError(f"artifact file corrupted (sha256 mismatch): {p}")
        files[name] = data
    return {"config": meta["config"], "backbone": meta["backbone"], "files": files}


def scoring_context(info: dict[str, Any]) -> dict[str, Any]:
    """What the Backbone deployment needs of a published version to answer for it (sent with each
    request: small, and the bank's ObjectRef stays a reference)."""
    keys = ("name", "sha", "version", "created", "threshold", "threshold_source", "score_stats", "shards",
            "bank_source", "feature_dim", "index", "num_neighbors", "blur_sigma", "data", "mean", "std")
    return {**{k: info[k] for k in keys}, "search": info.get("search", "shards")}
