"""The feature extractor F as the trainers build it: every level from the shallowest to the deepest
layer any part uses, because D consumes them all."""
from __future__ import annotations

from ..config import Config
from ..models.backbone import FeatureExtractor


def needed_layers(cfg: Config) -> list[str]:
    """Every feature level of F from the shallowest down to the deepest layer any part uses
    (``backbone.layers``, and ``backbone.stage2_layers`` when stage II runs): D consumes them all.
    Raises ValueError naming the setting when a layer the config names (these, and
    ``stage2.trainable_from``) is not one of the backbone's feature layers."""
    import timm

    names = timm.create_model(cfg.backbone.name, pretrained=False, features_only=True).feature_info.module_name()
    used = list(cfg.backbone.layers) + (list(cfg.backbone.stage2_layers) if cfg.stage2.enabled else [])
    missing = [l for l in used if l not in names]
    if missing:
        raise ValueError(f"backbone {cfg.backbone.name!r} has no feature layer(s) {missing}; available: {names}")
    start = cfg.stage2.trainable_from if cfg.stage2.enabled else None
    if start is not None and start not in names:
        raise ValueError(f"stage2.trainable_from: backbone {cfg.backbone.name!r} has no feature layer {start!r}; "
                         f"available: {names}")
    return names[: max(names.index(l) for l in used) + 1]


def build_extractor(cfg: Config, weights: str | None = None) -> FeatureExtractor:
    """F with all ``needed_layers``; its ``body.state_dict()`` loads into any FeatureExtractor of the
    same backbone with a subset of these layers (loading is by name)."""
    return FeatureExtractor(cfg.backbone.name, layers=needed_layers(cfg), weights=weights or cfg.backbone.weights)
