"""Typed service configuration, loaded from YAML.

``serve/config.yaml`` is a regular Ray Serve config file (deployable with ``serve deploy``); the
service's own settings are the ``args`` of its application. :func:`load_config` accepts either that
whole file or a bare mapping of the args.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from tocoad_ray.errors import TocoadError

# Product names become URL segments and multiplex ids; never path components. Anything else is
# rejected before any lookup, so a name cannot reach the filesystem.
PRODUCT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TOKEN_ENV = "TOCOAD_SERVE_TOKEN"


class ConfigError(TocoadError, ValueError):
    """The service configuration is invalid."""


def valid_product_name(name: str) -> bool:
    return bool(PRODUCT_NAME.match(name)) and ".." not in name


RUNTIMES = ("ray", "onnx", "openvino")
READINESS = ("healthy", "strict")


@dataclass
class ProductConfig:
    name: str
    artifact: str  # the artifact folder; with runtime onnx / openvino, the exported model file
    shards: int | None = None  # None: ServeConfig.default_shards
    threshold: float | None = None  # overrides the artifact's meta threshold
    # ray: backbone replicas + the bank in shards; onnx / openvino: the exported model
    # (`tocoad export`) on ONNX Runtime / OpenVINO, the same graph an edge box runs
    runtime: str = "ray"


@dataclass
class Autoscaling:
    """How fast a deployment follows scoring traffic (Ray Serve's autoscaling_config). Ray's
    defaults (30 s before a scale-up, 10 min before a scale-down, 30 s averaging window) suit
    long-lived traffic; scoring load arrives in bursts (a line starts, a shift ends), so a replica
    is asked for after a few seconds of queueing (starting it takes longer: a new process
    loads torch and the model) and removed after a minute of quiet."""

    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 60.0
    look_back_period_s: float = 5.0  # the window the ongoing-request average is taken over
    metrics_interval_s: float = 2.0  # how often replicas report their queue


@dataclass
class BackboneDeployment:
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 4
    max_ongoing_requests: int = 32
    # a fraction, so a second replica fits next to the others on a small node; on a GPU node,
    # num_gpus decides the packing (cluster.yaml's gpu_worker: 8 CPU, 1 GPU)
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    # images per forward pass, and how long at most an image that finds the replica idle waits for
    # others (under load a batch is what arrived while the previous one ran); the wait ends once as
    # many images as the last batch held have arrived, so a client alone does not wait. 4 suits CPU
    # replicas (the forward pass is cache-bound: the library scored 24 images/s at batch 4 and 19 at
    # 16 on a 2-core node); a GPU replica wants 16 or more
    max_batch_size: int = 4
    batch_wait_timeout_s: float = 0.05
    # 0: every core of the node. Ray gives an actor with num_cpus 0.5 one thread, which halves the
    # forward pass; the fraction is for packing replicas, not a limit on the compute they use
    torch_threads: int = 0
    autoscaling: Autoscaling = field(default_factory=Autoscaling)


@dataclass
class ShardDeployment:
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 8
    max_ongoing_requests: int = 64
    num_cpus: float = 0.25
    num_gpus: float = 0.0
    faiss_threads: int = 0  # 0: every core of the node (CPU search), as the Backbone's torch_threads
    autoscaling: Autoscaling = field(default_factory=Autoscaling)


@dataclass
class SmallDeployment:
    num_replicas: int = 1
    num_cpus: float = 0.25
    max_ongoing_requests: int = 64


@dataclass
class DriftConfig:
    """Drift watch (tocoad_ray/drift.py): per product, the last ``window`` scores against the
    artifact's leave-one-out normal scores; alarm when, with at least ``min_images`` scores, the KS
    shift or the share above threshold is significant at ``alpha``."""

    window: int = 200
    min_images: int = 30
    alpha: float = 0.01
    trend_every: int = 10  # one trend point per this many scores
    trend_points: int = 60  # trend points kept per product


@dataclass
class ServeConfig:
    products: list[ProductConfig] = field(default_factory=list)
    artifacts_dir: str | None = None  # every subdirectory with a meta.json becomes a product
    default_shards: int = 1
    # a product with one shard whose bank (as stored in memory) is at most this many MB is searched
    # in the Backbone replica, next to F: no hop to a BankShard, the library's in-process speed;
    # 0: every bank goes to BankShard replicas. Products with shards >= 2 always do.
    local_bank_max_mb: float = 256.0
    poll_interval_s: float = 2.0  # registry: how often config + artifact meta.json are re-checked
    watch_file: str | None = None  # re-read products/limits/auth from this YAML on every poll
    snapshot_ttl_s: float = 0.5  # ingress: how long a registry snapshot is reused
    max_upload_bytes: int = 16 << 20
    max_pixels: int = 40_000_000
    body_timeout_s: float = 30.0  # a request body that has not fully arrived by then is answered 408
    max_batch_images: int = 16  # POST .../score-batch: images per request
    auth_token: str | None = None  # bearer token for scoring routes; env TOCOAD_SERVE_TOKEN wins
    map_array_size: int = 32  # ?map=array is downsampled to at most this many cells per side
    backbone: BackboneDeployment = field(default_factory=BackboneDeployment)
    shards: ShardDeployment = field(default_factory=ShardDeployment)
    ingress: SmallDeployment = field(default_factory=SmallDeployment)
    registry: SmallDeployment = field(default_factory=lambda: SmallDeployment(num_cpus=0.1))
    # products with runtime onnx / openvino; no replica until such a product is loaded
    edge: BackboneDeployment = field(default_factory=lambda: BackboneDeployment(min_replicas=0))
    drift: DriftConfig = field(default_factory=DriftConfig)
    # /readyz: "healthy" (200 once every product has finished loading, ready or not, and at least
    # one can be scored; a broken product stays in the listing and metrics but does not take a
    # working server out of a load balancer's rotation) or "strict" (200 only when every product
    # can be scored)
    readiness: str = "healthy"
    # Ray Serve's per-request access log ("CALL ... OK", three lines per scored image); errors are
    # logged either way, one line each with the request id
    access_log: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def effective_token(self) -> str | None:
        return os.environ.get(TOKEN_ENV) or self.auth_token or None


def _build(cls, data: Any, where: str):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    kw = {}
    for k, v in data.items():
        t = names[k].type
        sub = {"BackboneDeployment": BackboneDeployment, "ShardDeployment": ShardDeployment,
               "SmallDeployment": SmallDeployment, "DriftConfig": DriftConfig, "Autoscaling": Autoscaling}.get(t if isinstance(t, str) else getattr(t, "__name__", ""))
        kw[k] = _build(sub, v, f"{where}.{k}") if sub else v
    return cls(**kw)


def from_dict(data: dict[str, Any] | None) -> ServeConfig:
    """Validate a mapping of service settings (the application's ``args``)."""
    data = dict(data or {})
    prods = data.pop("products", None) or []
    cfg = _build(ServeConfig, data, "config")
    if not isinstance(prods, list):
        raise ConfigError("config.products: expected a list")
    seen = set()
    for i, p in enumerate(prods):
        pc = p if isinstance(p, ProductConfig) else _build(ProductConfig, p, f"config.products[{i}]")
        if not valid_product_name(pc.name):
            raise ConfigError(f"config.products[{i}]: invalid product name {pc.name!r} (letters, digits, _ . -)")
        if pc.name in seen:
            raise ConfigError(f"config.products: duplicate product {pc.name!r}")
        if pc.shards is not None and int(pc.shards) < 1:
            raise ConfigError(f"config.products[{i}]: shards must be >= 1")
        if pc.runtime not in RUNTIMES:
            raise ConfigError(f"config.products[{i}]: runtime must be one of {', '.join(RUNTIMES)}, got {pc.runtime!r}")
        seen.add(pc.name)
        cfg.products.append(pc)
    if cfg.local_bank_max_mb < 0:
        raise ConfigError("config.local_bank_max_mb must be >= 0")
    if cfg.default_shards < 1:
        raise ConfigError("config.default_shards must be >= 1")
    if cfg.readiness not in READINESS:
        raise ConfigError(f"config.readiness must be one of {', '.join(READINESS)}, got {cfg.readiness!r}")
    if cfg.poll_interval_s <= 0:
        raise ConfigError("config.poll_interval_s must be > 0")
    if cfg.body_timeout_s <= 0:
        raise ConfigError("config.body_timeout_s must be > 0")
    if cfg.max_batch_images < 1:
        raise ConfigError("config.max_batch_images must be >= 1")
    for name in ("backbone", "shards", "edge"):
        dep = getattr(cfg, name)
        if not 0 <= dep.min_replicas <= dep.max_replicas or dep.max_replicas < 1:
            raise ConfigError(f"config.{name}: need 0 <= min_replicas <= max_replicas and max_replicas >= 1")
        a = dep.autoscaling
        if min(a.upscale_delay_s, a.downscale_delay_s) < 0 or min(a.look_back_period_s, a.metrics_interval_s) <= 0:
            raise ConfigError(f"config.{name}.autoscaling: delays must be >= 0 and look_back_period_s, "
                              f"metrics_interval_s > 0")
    d = cfg.drift
    if d.window < 1 or d.min_images < 1 or d.trend_every < 1 or d.trend_points < 1:
        raise ConfigError("config.drift: window, min_images, trend_every and trend_points must be >= 1")
    if not 0.0 < d.alpha < 1.0:
        raise ConfigError(f"config.drift.alpha must be in (0, 1), got {d.alpha}")
    return cfg


def read_yaml_args(path: str | Path) -> dict[str, Any]:
    """The service args from a YAML file: a Serve config (``applications[*].args`` of the app whose
    import_path is ``serve.app:build``) or a bare mapping."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read service config {path}: {e}") from e
    if isinstance(data, dict) and "applications" in data:
        for app in data["applications"] or []:
            if str(app.get("import_path", "")).startswith("serve.app:"):
                return dict(app.get("args") or {})
        raise ConfigError(f"{path}: no application with import_path serve.app:build")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping")
    return data


def load_config(path: str | Path) -> ServeConfig:
    return from_dict(read_yaml_args(path))


def resolve_products(cfg: ServeConfig) -> list[ProductConfig]:
    """Explicit products plus one per artifact folder of ``artifacts_dir`` (explicit entries win)."""
    out = {p.name: p for p in cfg.products}
    if cfg.artifacts_dir:
        root = Path(cfg.artifacts_dir)
        if root.is_dir():
            for d in sorted(root.iterdir()):
                if d.is_dir() and (d / "meta.json").is_file() and valid_product_name(d.name) and d.name not in out:
                    out[d.name] = ProductConfig(d.name, str(d))
    for p in out.values():
        if p.shards is None:
            p.shards = cfg.default_shards
    return list(out.values())
