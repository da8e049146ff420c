"""Product registry: watches the config and each artifact's meta.json, publishes immutable snapshots.

A product version is identified by the sha256 of its meta.json (which lists the sha256 of every
other artifact file). When it changes, the new version's backbone and shards are loaded (warmed)
first and only then swapped into the published snapshot in one assignment: requests that already
took the old snapshot finish on the old version's shards, which stay loaded until the replicas'
LRU evicts them; a version that fails to load leaves the old one serving and is reported.
"""
from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from pathlib import Path
from typing import Any

from ray import serve

from tocoad_ray.artifact import read_meta

from .backbone import backbone_id
from .config import ServeConfig, from_dict, read_yaml_args, resolve_products
from .shards import meta_sha, shard_bounds, shard_id

WARM_TIMEOUT_S = 300.0


def effective_config(args: dict[str, Any], overrides: dict[str, Any]) -> ServeConfig:
    """``args`` (or, when ``watch_file`` is set, that file's args again) with CLI ``overrides`` on top."""
    watch = (overrides.get("watch_file") or args.get("watch_file"))
    base = read_yaml_args(watch) if watch else args
    return from_dict({**base, **overrides, **({"watch_file": watch} if watch else {})})


@serve.deployment(name="Registry")
class Registry:
    def __init__(self, backbone, shard, args: dict[str, Any], overrides: dict[str, Any] | None = None):
        self.backbone, self.shard = backbone, shard
        self.args, self.overrides = dict(args or {}), dict(overrides or {})
        self.cfg = effective_config(self.args, self.overrides)
        self.products: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, str] = {}
        self.generation = 0
        self.last_poll = 0.0
        self._poll_lock = threading.Lock()
        self._stop = threading.Event()
        # a thread, not an asyncio task: warming waits on handles with .result(), which must not
        # run on the replica's event loop
        self._thread = threading.Thread(target=self._loop, name="registry-poll", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as e:  # keep polling; the error is visible in /v1/products
                self.errors["_config"] = f"{type(e).__name__}: {e}"
            self._stop.wait(self.cfg.poll_interval_s)

    def poll_once(self) -> bool:
        """Re-read config and artifact versions; load and swap changed products. True if changed."""
        with self._poll_lock:
            cfg = effective_config(self.args, self.overrides)
            self.cfg = cfg
            self.errors.pop("_config", None)
            new = dict(self.products)
            changed = False
            wanted = resolve_products(cfg)
            for name in set(new) - {p.name for p in wanted}:
                del new[name]
                self.errors.pop(name, None)
                changed = True
            for p in wanted:
                try:
                    artifact = str(Path(p.artifact).resolve())
                    sha = meta_sha(artifact)
                    key = (artifact, sha, p.shards, p.threshold)
                    if name_key(new.get(p.name)) == key:
                        continue
                    new[p.name] = self._load(p.name, artifact, sha, p.shards, p.threshold)
                    self.errors.pop(p.name, None)
                    changed = True
                except Exception as e:
                    self.errors[p.name] = f"{type(e).__name__}: {e}"
            if changed:
                self.products = new  # the atomic swap: one reference assignment
                self.generation += 1
            self.last_poll = time.time()
            return changed

    def _load(self, name: str, artifact: str, sha: str, shards: int, threshold: float | None) -> dict[str, Any]:
        meta = read_meta(artifact, verify=True)
        if meta_sha(artifact) != sha:
            raise RuntimeError("artifact changed while loading; retrying on the next poll")
        bounds = shard_bounds(int(meta["bank_size"]), shards)
        ids = [shard_id(artifact, sha, i, len(bounds) - 1) for i in range(len(bounds) - 1)]
        bid = backbone_id(artifact, sha)
        # warm everything before publishing, so the swap never exposes a half-loaded version
        pending = [self.backbone.options(multiplexed_model_id=bid).warm.remote()]
        pending += [self.shard.options(multiplexed_model_id=m).info.remote() for m in ids]
        for r in pending:
            r.result(timeout_s=WARM_TIMEOUT_S)
        cfg = meta["config"]
        return {
            "name": name, "artifact": artifact, "sha": sha, "version": sha[:12], "created": meta.get("created"),
            "method": meta.get("method"), "category": meta.get("category"),
            "threshold": float(threshold) if threshold is not None else float(meta["threshold"]),
            "threshold_source": "config" if threshold is not None else "artifact",
            "artifact_threshold": float(meta["threshold"]), "score_stats": meta.get("score_stats", {}),
            "backbone": meta["backbone"]["name"], "layers": meta["backbone"]["layers"],
            "mean": meta["backbone"]["mean"], "std": meta["backbone"]["std"],
            "bank_size": int(meta["bank_size"]), "feature_dim": int(meta["feature_dim"]),
            "input_size": int(meta["input_size"]), "grid": meta.get("grid"), "data": cfg["data"],
            "num_neighbors": int(cfg["bank"]["num_neighbors"]), "blur_sigma": float(cfg["bank"]["blur_sigma"]),
            "backbone_id": bid,
            "shards": [{"id": m, "offset": bounds[i], "size": bounds[i + 1] - bounds[i]} for i, m in enumerate(ids)],
            "loaded_at": time.time(),
            "_key": (artifact, sha, shards, threshold),
        }

    def snapshot(self) -> dict[str, Any]:
        cfg = self.cfg
        token = cfg.effective_token()
        return {
            "generation": self.generation, "products": self.products, "errors": dict(self.errors),
            "last_poll": self.last_poll, "poll_interval_s": cfg.poll_interval_s,
            "settings": {
                "max_upload_bytes": cfg.max_upload_bytes, "max_pixels": cfg.max_pixels,
                "map_array_size": cfg.map_array_size, "snapshot_ttl_s": cfg.snapshot_ttl_s,
                "auth_sha256": hashlib.sha256(token.encode()).hexdigest() if token else None,
            },
        }

    async def reload(self) -> dict[str, Any]:
        """Poll now (tests, operators) and return the new snapshot."""
        await asyncio.to_thread(self.poll_once)  # off the event loop: warming blocks on handles
        return self.snapshot()

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("registry poll thread died")

    def __del__(self):
        self._stop.set()


def name_key(info: dict[str, Any] | None):
    return None if info is None else info["_key"]
