"""Feature extractor F: a timm ``features_only`` network returning named layers.

Layers are named by module (``blocks.2``, ``layer2``) so configs read like the paper: WideResNet50
``layer2``+``layer3``, EfficientNet-Lite0 analogues ``blocks.2`` (stride 8) + ``blocks.4`` (stride 16).
"""
from __future__ import annotations

import torch
from torch import nn

from .weights import WeightsError, load_into, load_state_dict_file, resolve_pretrained, state_dict_sha256


# timm's own fallback when a model's pretrained config names no normalisation
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) F's input is normalised with, from timm's pretrained config (no model built)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:  # a name timm only knows through create_model: build the probe
        cfg = timm.create_model(name, pretrained=False, features_only=True).pretrained_cfg
    get = cfg.get if isinstance(cfg, dict) else lambda k, d: getattr(cfg, k, None) or d
    return (tuple(float(v) for v in get("mean", IMAGENET_MEAN)), tuple(float(v) for v in get("std", IMAGENET_STD)))


class FeatureExtractor(nn.Module):
    """F(x) → {layer name: feature map}. ``weights``: "pretrained" | "random" | path to a state dict."""

    def __init__(self, name: str = "tf_efficientnet_lite0", layers: list[str] | tuple[str, ...] = ("blocks.2", "blocks.4"),
                 weights: str = "pretrained"):
        super().__init__()
        import timm

        self.name = name
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("backbone.layers must name at least one layer")
        probe = timm.create_model(name, pretrained=False, features_only=True)
        available = probe.feature_info.module_name()
        missing = [l for l in self.layers if l not in available]
        if missing:
            raise ValueError(f"backbone {name!r} has no feature layer(s) {missing}; available: {available}")
        out_indices = sorted(available.index(l) for l in self.layers)
        self.body = timm.create_model(name, pretrained=False, features_only=True, out_indices=out_indices)
        names = self.body.feature_info.module_name()
        self._order = [names.index(l) for l in self.layers]
        self.channels = {l: self.body.feature_info.channels()[names.index(l)] for l in self.layers}
        self.reductions = {l: self.body.feature_info.reduction()[names.index(l)] for l in self.layers}
        cfg = probe.pretrained_cfg
        self.mean = tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN))
        self.std = tuple(float(v) for v in cfg.get("std", IMAGENET_STD))
        self.input_size = tuple(int(v) for v in cfg.get("input_size", (3, 224, 224)))
        self.weights_source = "random"
        if weights == "pretrained":
            sd, self.weights_source = resolve_pretrained(name)
            load_into(self.body, sd, self.weights_source)
        elif weights != "random":
            load_into(self.body, load_state_dict_file(weights), str(weights))
            self.weights_source = f"file:{weights}"
        self.weights_sha256 = state_dict_sha256(self.body.state_dict())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.body(x)
        return {l: feats[i] for l, i in zip(self.layers, self._order)}

    def _meta_forward(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """F on the meta device with stand-ins for its parameters (requiring grad): ({name: stand-in},
        features). No computation; F's own weights, buffers and modes are untouched."""
        params = {n: torch.empty_like(p, device="meta").requires_grad_(True) for n, p in self.named_parameters()}
        buffers = {n: torch.empty_like(b, device="meta") for n, b in self.named_buffers()}
        x = torch.zeros(1, *self.input_size, device="meta")
        return params, torch.func.functional_call(self, {**params, **buffers}, (x,))

    def unused_parameters(self, layers: list[str] | tuple[str, ...] | None = None) -> list[str]:
        """Names (as in ``named_parameters``) of the parameters with no path to any of ``layers``
        (default: every output layer), e.g. the blocks after the deepest layer, which timm's
        EfficientNet ``features_only`` runs whatever its ``out_indices``. Found by a backward pass
        on the meta device: no computation, and F's weights, buffers and modes are untouched."""
        wanted = list(self.layers if layers is None else layers)
        missing = [l for l in wanted if l not in self.layers]
        if missing:
            raise ValueError(f"extractor has no output layer(s) {missing}; it has {self.layers}")
        with torch.inference_mode(False), torch.enable_grad():  # whatever the caller's mode
            params, feats = self._meta_forward()
            grads = torch.autograd.grad([feats[l].sum() for l in wanted], list(params.values()), allow_unused=True)
        return [n for n, g in zip(params, grads) if g is None]

    def parameters_before(self, layer: str) -> list[str]:
        """Names (as in ``named_parameters``) of the parameters that feed the input of F's module
        ``layer`` (e.g. ``blocks.2``: the stem, ``blocks.0`` and ``blocks.1``); freezing them ends the
        backward pass at that module. Found on the meta device like ``unused_parameters``."""
        modules = dict(self.body.named_modules())
        module = modules.get(layer) or modules.get(layer.replace(".", "_"))  # FeatureDictNet flattens names
        if not layer or module is None or module is self.body:
            raise ValueError(f"backbone {self.name!r} has no layer {layer!r}; its feature layers are "
                             f"{self.body.feature_info.module_name()}")
        inputs: list[torch.Tensor] = []
        hook = module.register_forward_pre_hook(lambda m, args: inputs.append(args[0]) if not inputs else None)
        try:
            with torch.inference_mode(False), torch.enable_grad():
                params, _ = self._meta_forward()
                if not inputs[0].requires_grad:  # nothing trainable before it
                    return []
                grads = torch.autograd.grad(inputs[0].sum(), list(params.values()), allow_unused=True)
        finally:
            hook.remove()
        return [n for n, g in zip(params, grads) if g is not None]

    def refresh_checksum(self) -> str:
        """Recompute the weights checksum after fine-tuning (ToCoAD stage II)."""
        self.weights_sha256 = state_dict_sha256(self.body.state_dict())
        return self.weights_sha256


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" → cuda when available, else cpu. Asking for cuda without a GPU is an error, not a fallback."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA GPU; use device: auto or cpu")
    return dev


__all__ = ["FeatureExtractor", "WeightsError", "resolve_device"]
