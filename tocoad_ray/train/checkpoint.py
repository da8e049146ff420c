"""Per-epoch checkpoints of a training stage, written atomically.

Layout of ``workdir/stage1/`` (or ``stage2/``) after epoch e (1-based count of finished epochs):

* ``model_e{e:04d}.safetensors`` — model weights (flat tensor dict),
* ``state_e{e:04d}.pt`` — optimizer / scheduler / epoch / RNG state, only tensors and primitive
  types, read back with ``torch.load(weights_only=True)``,
* ``latest.json`` — the pointer ``{"epoch", "files": {name: sha256}, "fingerprint", ...}``.

Every file goes to a temporary name and is moved into place with ``os.replace``; ``latest.json``
is written last, so a crash at any point leaves the previous checkpoint intact. Files of older
epochs are removed after the pointer moves. A checksum mismatch or unreadable file is a
``CheckpointError`` naming the file.
"""
from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError  # noqa: F401 (re-exported)
from ..fileio import atomic_write, sha256_file

POINTER = "latest.json"


def to_primitive(obj: Any) -> Any:
    """Make a state dict loadable with ``weights_only=True``: Counters/OrderedDicts → dict,
    tensors detached to cpu, everything else must be a primitive."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):  # includes Counter, OrderedDict
        return {k: to_primitive(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_primitive(v) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} with weights_only loading")


def read_pointer(stage_dir: Path) -> dict | None:
    p = Path(stage_dir) / POINTER
    if not p.exists():
        return None
    try:
        meta = json.loads(p.read_text())
        int(meta["epoch"]), dict(meta["files"])
    except Exception as e:
        raise CheckpointError(f"checkpoint pointer {p} is corrupted ({e}); delete {stage_dir} or train with resume=False") from e
    return meta


def save_checkpoint(stage_dir: Path, state: dict[str, Any], meta: dict[str, Any] | None = None) -> dict:
    """Write ``state`` (a trainer's ``state_dict()``: ``model`` tensor dict + the rest) for epoch
    ``state["epoch"]``. Returns the pointer written."""
    from safetensors.torch import save_file

    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    epoch = int(state["epoch"])
    model = {k: v.detach().cpu().contiguous() for k, v in state["model"].items()}
    rest = to_primitive({k: v for k, v in state.items() if k != "model"})
    names = {"model": f"model_e{epoch:04d}.safetensors", "state": f"state_e{epoch:04d}.pt"}
    atomic_write(stage_dir / names["model"], lambda p: save_file(model, str(p)))
    atomic_write(stage_dir / names["state"], lambda p: torch.save(rest, p))
    pointer = {"epoch": epoch, "files": {n: sha256_file(stage_dir / n) for n in names.values()},
               "model": names["model"], "state": names["state"], **(meta or {})}
    atomic_write(stage_dir / POINTER, lambda p: p.write_text(json.dumps(pointer, indent=1)))
    keep = set(names.values()) | {POINTER}
    for old in stage_dir.iterdir():
        if old.name not in keep and old.suffix in (".safetensors", ".pt") and old.name.startswith(("model_e", "state_e")):
            old.unlink()
    return pointer


def load_checkpoint(stage_dir: Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict]:
    """Verify checksums and read the latest checkpoint → (state dict for ``load_state_dict``, pointer)."""
    from safetensors.torch import load_file

    stage_dir = Path(stage_dir)
    meta = read_pointer(stage_dir)
    if meta is None:
        raise CheckpointError(f"no checkpoint in {stage_dir} ({POINTER} missing)")
    hint = f"delete {stage_dir} or train with resume=False"
    for name, digest in meta["files"].items():
        path = stage_dir / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing; {hint}")
        actual = sha256_file(path)
        if actual != digest:
            raise CheckpointError(f"checkpoint file {path} is corrupted (sha256 {actual[:12]}… != recorded {digest[:12]}…); {hint}")
    try:
        model = load_file(str(stage_dir / meta["model"]), device=str(map_location))
        rest = torch.load(stage_dir / meta["state"], map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint in {stage_dir}: {e}; {hint}") from e
    rest["model"] = model
    return rest, meta


def clear_checkpoint(stage_dir: Path) -> None:
    """Forget a stage's checkpoint (pointer first, so a crash midway leaves no valid-looking state)."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return
    (stage_dir / POINTER).unlink(missing_ok=True)
    for f in stage_dir.iterdir():
        if f.name.startswith(("model_e", "state_e")):
            f.unlink()


def restore_counter(sched_state: dict) -> dict:
    """MultiStepLR keeps ``milestones`` as a Counter, saved as a plain dict; turn it back."""
    if isinstance(sched_state.get("milestones"), dict):
        sched_state = dict(sched_state, milestones=collections.Counter(sched_state["milestones"]))
    return sched_state
