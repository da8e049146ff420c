"""The typed search space and settings of ``tocoad tune``, checked before any trial starts.

A search file is a normal config (the base every trial starts from) plus a ``search`` section::

    method: tocoad
    stage1: {epochs: 2}
    search:
      num_samples: 4
      space:
        stage2.lam: {uniform: [0.1, 0.9]}
        stage2.lr: {loguniform: [3.0e-4, 1.0e-2]}
        generator.kind: {choice: [perlin, cutpaste]}
        backbone.stage2_layers: {choice: [[blocks.4, blocks.6], [blocks.2, blocks.4]]}

Keys are dotted config keys; each value is one distribution: ``choice`` (a list of values),
``uniform`` / ``loguniform`` ([low, high], float keys), ``randint`` ([low, high), int keys). Every
candidate (each choice, each bound) must make a valid config, and the key must matter for the
method searched; otherwise the error names the entry before anything runs.
"""
from __future__ import annotations

import json
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import Config, ConfigError, build_config, from_dict
from .digest import digest
from .validation import METRICS, ValidationConfig, resolve_generator

KINDS = ("choice", "uniform", "loguniform", "randint")
# config sections (or single keys) each method's result depends on
RELEVANT = {
    "patchcore": ("data.", "bank.", "backbone.name", "backbone.layers", "backbone.weights"),
    "reconpatch": ("data.", "bank.", "backbone.name", "backbone.layers", "backbone.weights", "reconpatch."),
    "tocoad": ("data.", "bank.", "backbone.", "generator.", "stage1.", "stage2."),
}


@dataclass
class AshaConfig:
    """ASHA early stopping on the validation score (``training_iteration`` = reports so far: one
    per training epoch, quick bank, plus the final full-bank score)."""

    enabled: bool = True
    grace_period: int = 1
    reduction_factor: int = 2

    def __post_init__(self) -> None:
        if self.grace_period < 1:
            raise ConfigError(f"search.asha.grace_period must be >= 1, got {self.grace_period}")
        if self.reduction_factor < 2:
            raise ConfigError(f"search.asha.reduction_factor must be >= 2, got {self.reduction_factor}")


@dataclass
class SearchConfig:
    """``search`` section. ``space`` None: the method's default space (``default_space``)."""

    num_samples: int = 4  # sampled configurations per category
    metric: str = "val_score"  # val_score (mean of the three) | val_image_auroc | val_pixel_auroc | val_aupro
    max_concurrent_trials: int = 0  # 0: as many as the cluster's CPUs / GPUs / memory admit
    max_failures: int = 1  # a failed trial is retried this often (it resumes from its checkpoints)
    seed: int = 0  # sampling seed
    evaluate_trials_on_test: bool = True  # after selection: every finished trial on test, for the val-vs-test plot
    space: dict[str, dict[str, Any]] | None = None
    asha: AshaConfig = field(default_factory=AshaConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ConfigError(f"search.num_samples must be >= 1, got {self.num_samples}")
        if self.metric not in METRICS:
            raise ConfigError(f"search.metric must be one of {list(METRICS)}, got {self.metric!r}")
        if self.max_concurrent_trials < 0:
            raise ConfigError(f"search.max_concurrent_trials must be >= 0, got {self.max_concurrent_trials}")


def default_space(cfg: Config) -> dict[str, dict[str, Any]]:
    """The method's default space around the base config (its values stay reachable)."""
    ratio = sorted({cfg.bank.coreset_ratio, 0.01, 0.1})
    space: dict[str, dict[str, Any]] = {"bank.coreset_ratio": {"choice": ratio}}
    if cfg.method == "tocoad":
        s1, s2 = cfg.stage1, cfg.stage2
        layers = [list(cfg.backbone.stage2_layers)]
        if list(cfg.backbone.layers) != layers[0]:
            layers.append(list(cfg.backbone.layers))
        space.update({
            "stage2.lam": {"uniform": [0.1, 0.9]},
            "stage1.lr": {"loguniform": [s1.lr / 3, s1.lr * 3]},
            "stage2.lr": {"loguniform": [s2.lr / 10, s2.lr * 10]},
            "stage1.epochs": {"choice": sorted({max(1, s1.epochs // 2), s1.epochs})},
            "stage2.epochs": {"choice": sorted({max(1, s2.epochs // 2), s2.epochs})},
            "generator.kind": {"choice": ["perlin", "cutpaste"]},
            "backbone.stage2_layers": {"choice": layers},
            # stage II variants (docs/methods.md "Stage II variants"); the base config's values stay reachable
            "stage2.contrast": {"choice": sorted({s2.contrast, "global", "dense"})},
            "stage2.preserve": {"choice": sorted({s2.preserve, "none", "feature", "l2sp"})},
            "stage2.preserve_weight": {"loguniform": [min(0.3, s2.preserve_weight or 0.3), max(30.0, s2.preserve_weight)]},
        })
    elif cfg.method == "reconpatch":
        r = cfg.reconpatch
        space.update({
            "reconpatch.alpha": {"uniform": [0.2, 0.8]},
            "reconpatch.margin": {"uniform": [0.5, 2.0]},
            "reconpatch.sigma": {"choice": [None, 0.5, 1.0, 2.0]},  # None: the batch's median distance
            "reconpatch.lr": {"loguniform": [r.lr / 3, r.lr * 3]},
        })
    else:
        space.update({"bank.num_neighbors": {"choice": [3, 9]}, "bank.patch_size": {"choice": [3, 5]}})
    return space


def _leaf_keys(cls: type, prefix: str = "") -> set[str]:
    hints = typing.get_type_hints(cls)
    keys: set[str] = set()
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            keys |= _leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.add(prefix + f.name)
    return keys


CONFIG_KEYS = _leaf_keys(Config)


def apply(base: Config, params: dict[str, Any]) -> Config:
    """The base config with a trial's sampled values (dotted keys) set."""
    data = base.to_dict()
    for dotted, value in params.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return from_dict(Config, data)


def candidates(dist: dict[str, Any], key: str) -> list[Any]:
    """Every value the distribution can take that must form a valid config (choices, or bounds)."""
    if not isinstance(dist, dict) or len(dist) != 1:
        raise ConfigError(f"search.space[{key}]: expected one distribution like {{choice: [...]}} or "
                          f"{{uniform: [low, high]}}, got {dist!r}")
    (kind, values), = dist.items()
    if kind not in KINDS:
        raise ConfigError(f"search.space[{key}]: unknown distribution {kind!r}; use one of {list(KINDS)}")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"search.space[{key}]: {kind} needs a non-empty list, got {values!r}")
    if kind == "choice":
        return list(values)
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"search.space[{key}]: {kind} needs [low, high] numbers, got {values!r}")
    low, high = values
    if not low < high:
        raise ConfigError(f"search.space[{key}]: {kind} needs low < high, got {values!r}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"search.space[{key}]: loguniform needs low > 0, got {low}")
    if kind == "randint":
        if not all(isinstance(v, int) for v in values):
            raise ConfigError(f"search.space[{key}]: randint needs integer bounds, got {values!r}")
        return [low, high - 1]
    return [float(low), float(high)]


def check_space(base: Config, space: dict[str, dict[str, Any]]) -> dict[str, list[Any]]:
    """Raise ConfigError naming the first bad entry; return every key's candidate values."""
    from .train.extractor import needed_layers

    if not space:
        raise ConfigError("search.space is empty: nothing to search")
    out = {}
    for key, dist in space.items():
        if key not in CONFIG_KEYS:
            close = sorted(k for k in CONFIG_KEYS if k.split(".")[-1] == key.split(".")[-1])
            raise ConfigError(f"search.space[{key}]: not a config key" + (f" (did you mean {close}?)" if close else ""))
        if key.startswith("distributed.") or key == "method":
            raise ConfigError(f"search.space[{key}]: {key} is not a search dimension "
                              "(distributed settings do not change the result; search one method per run)")
        if not key.startswith(RELEVANT[base.method]):
            raise ConfigError(f"search.space[{key}]: has no effect with method {base.method!r}")
        values = candidates(dist, key)
        for v in values:
            try:
                cfg = apply(base, {key: v})
                if key.startswith("backbone.") or key == "stage2.trainable_from":
                    needed_layers(cfg)
            except (ConfigError, ValueError) as e:
                raise ConfigError(f"search.space[{key}]: value {v!r} is invalid: {e}") from None
        out[key] = values
    return out


def training_generators(base: Config, space: dict[str, dict[str, Any]]) -> list[str]:
    """Every G a trial may train with (the validation generator must be none of them)."""
    if base.method != "tocoad":
        return []
    kinds = {base.generator.kind}
    if "generator.kind" in space:
        kinds |= set(candidates(space["generator.kind"], "generator.kind"))
    return sorted(kinds)


def max_reports(base: Config, space: dict[str, dict[str, Any]]) -> int:
    """Most reports a trial makes (ASHA's max_t): one per epoch of each enabled stage + the final one."""
    if base.method != "tocoad":
        return 1
    total = 1
    for stage in ("stage1", "stage2"):
        if not getattr(base, stage).enabled:
            continue
        key = f"{stage}.epochs"
        total += max(candidates(space[key], key)) if key in space else getattr(base, stage).epochs
    return total


@dataclass
class SearchPlan:
    """Everything a search runs with: base config, settings, the checked space, G_val."""

    base: Config
    search: SearchConfig
    space: dict[str, dict[str, Any]]
    val_generator: str

    def to_dict(self) -> dict[str, Any]:
        d = self.base.to_dict()
        s = json.loads(json.dumps(_asdict(self.search)))
        s["space"] = self.space
        d["search"] = s
        return d

    def digest(self) -> str:
        return digest(self.to_dict(), 12)


def _asdict(obj: Any) -> Any:
    from dataclasses import asdict

    return asdict(obj)


def load_plan(path: str | Path | None, overrides: dict[str, Any] | None = None,
              search_overrides: dict[str, Any] | None = None, method: str | None = None) -> SearchPlan:
    """Read a search file (config + ``search`` section; None: defaults), apply ``--set``-style
    overrides to either part, and check it all."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"search file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"search file {p} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"search file {p} must hold a mapping at the top level")
    search_data = data.pop("search", None) or {}
    if not isinstance(search_data, dict):
        raise ConfigError("search: expected a mapping")
    for dotted, value in (search_overrides or {}).items():
        node = search_data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    ov = dict(overrides or {})
    if method:
        ov["method"] = method
    base = build_config(data, ov)
    search = from_dict(SearchConfig, search_data, prefix="search.")
    space = search.space if search.space is not None else default_space(base)
    check_space(base, space)
    val_gen = resolve_generator(search.validation, training_generators(base, space)) if base.method == "tocoad" \
        else (search.validation.generator if search.validation.generator != "auto" else "nsa")
    return SearchPlan(base, search, space, val_gen)
