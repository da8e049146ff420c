"""Product registry: watches the config and each artifact's meta.json, publishes immutable snapshots.

A product version is identified by the sha256 of its meta.json (which lists the sha256 of every
other artifact file) in the folder of the artifact's current version (``current.json``, see
``tocoad_ray.artifact_versions``; the artifact folder itself when it has no versions), so a new
version written by feedback, or a rollback, is picked up like any other change. When it changes, the new version's backbone and shards are loaded (warmed)
first and only then swapped into the published snapshot in one assignment: requests that already
took the old snapshot finish on the old version's shards, which stay loaded until the replicas'
LRU evicts them; a version that fails to load leaves the old one serving and is reported.
"""
from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import logging

import numpy as np
from ray import serve

from tocoad_ray.artifact import read_meta
from tocoad_ray.artifact_versions import current_dir, current_version
from tocoad_ray.errors import ArtifactError, DataError

from .edge import edge_model_id, files_sha, model_files
from .config import ServeConfig, from_dict, read_yaml_args, resolve_products
from .errors import from_data_error, load_failure_kind
from .shards import meta_sha, read_bank, shard_bounds, shard_id
from .sources import backbone_id, model_source

log = logging.getLogger("ray.serve")

WARM_TIMEOUT_S = 300.0


def effective_config(args: dict[str, Any], overrides: dict[str, Any]) -> ServeConfig:
    """``args`` (or, when ``watch_file`` is set, that file's args again) with CLI ``overrides`` on top."""
    watch = (overrides.get("watch_file") or args.get("watch_file"))
    base = read_yaml_args(watch) if watch else args
    return from_dict({**base, **overrides, **({"watch_file": watch} if watch else {})})


@serve.deployment(name="Registry")
class Registry:
    """Publishes ``snapshot()``: the loaded products, each product's state, the service settings.

    Every configured (or found) product has a state: ``loading`` until its first version is
    published, ``ready`` while a version serves (an update that fails to load leaves the old one
    serving and is shown as ``update_error``), ``unavailable`` when no version could be loaded.
    States and errors follow the files: they clear when the cause is gone, and a product that is
    no longer configured or found is forgotten (404). Each published version's bank and model
    weights live in Ray's object store, and replicas load them from there."""

    def __init__(self, backbone, shard, args: dict[str, Any], overrides: dict[str, Any] | None = None, edge=None):
        self.backbone, self.shard, self.edge = backbone, shard, edge
        self.args, self.overrides = dict(args or {}), dict(overrides or {})
        self.cfg = effective_config(self.args, self.overrides)
        self.products: dict[str, dict[str, Any]] = {}
        self.states: dict[str, dict[str, Any]] = {}
        self.config_error: dict[str, Any] | None = None
        self.generation = 0
        self.last_poll = 0.0
        self._poll_lock = threading.Lock()
        # products and states change together: a snapshot never sees a product's state gone (or
        # ready) while its published version is still there (or not yet there)
        self._publish = threading.Lock()
        self._last_failure: dict[str, tuple[str, str] | str] = {}  # what was last logged, per product
        self._write_locks: dict[str, threading.Lock] = {}  # per product: feedback / rollback one at a time
        self._stop = threading.Event()
        # known before the first load finishes: a product still loading answers 503, never 404
        for p in resolve_products(self.cfg):
            self.states[p.name] = {"state": "loading", "since": time.time()}
        # a thread, not an asyncio task: warming waits on handles with .result(), which must not
        # run on the replica's event loop
        self._thread = threading.Thread(target=self._loop, name="registry-poll", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as e:  # keep polling; shown (without internals) in the listing
                if self.config_error is None or self._last_failure.get("") != str(e):
                    log.warning("registry: config error: %s: %s", type(e).__name__, e)
                    self._last_failure[""] = str(e)
                self.config_error = {"kind": "invalid_config", "message": "the service config cannot be read: "
                                     "the server log has the details", "since": time.time()}
            self._stop.wait(self.cfg.poll_interval_s)

    def _fail(self, name: str, e: BaseException) -> None:
        kind, message = load_failure_kind(e)
        loaded = name in self.products
        prev = self.states.get(name, {})
        # once per change of state: a product that stays broken is retried every poll, silently
        if self._last_failure.get(name) != (kind, str(e)):
            self._last_failure[name] = (kind, str(e))
            log.warning("registry: product %r failed to load (%s): %s: %s", name, kind, type(e).__name__, e)
        since = prev.get("since") if prev.get("kind") == kind else time.time()
        if loaded:
            self.states[name] = {**prev, "state": "ready", "update_error": {"kind": kind, "message": message},
                                 "kind": kind, "since": since}
        else:
            self.states[name] = {"state": "unavailable", "kind": kind, "message": message, "since": since}

    def poll_once(self) -> bool:
        """Re-read config and artifact versions; load and swap changed products. True if changed."""
        with self._poll_lock:
            cfg = effective_config(self.args, self.overrides)
            self.cfg = cfg
            self.config_error = None
            new = dict(self.products)
            changed = False
            wanted = resolve_products(cfg)
            names = {p.name for p in wanted}
            gone = (set(new) | set(self.states)) - names
            removed = False
            if gone:  # forgotten at once: state and published version in one step
                with self._publish:
                    for name in gone:
                        new.pop(name, None)
                        self.states.pop(name, None)
                    if set(self.products) & gone:
                        self.products = dict(new)
                        self.generation += 1
                        removed = True
            ready: dict[str, dict[str, Any]] = {}  # states of versions loaded now: set when they are published
            for p in wanted:
                self.states.setdefault(p.name, {"state": "loading", "since": time.time()})
                try:
                    artifact = str(Path(p.artifact).resolve())
                    root, number = artifact, None
                    if p.runtime == "ray":  # the current version's folder (immutable once written)
                        number = current_version(root)
                        artifact = str(current_dir(root))
                        sha, files = meta_sha(artifact), None
                    else:  # an exported model: its version is the sha256 of its files
                        files = model_files(artifact)
                        sha = files_sha(files)
                    key = (artifact, sha, p.shards, p.threshold, p.runtime)
                    if name_key(new.get(p.name)) != key:
                        new[p.name] = (self._load(p.name, artifact, sha, p.shards, p.threshold) if files is None else
                                       self._load_edge(p.name, artifact, sha, files, p.threshold, p.runtime))
                        new[p.name].update(artifact_root=root, artifact_version=number)
                        changed = True
                    ready[p.name] = {"state": "ready", "since": new[p.name]["loaded_at"]}
                    if self._last_failure.pop(p.name, None) is not None:
                        log.warning("registry: product %r loads again (version %s)", p.name, sha[:12])
                except Exception as e:  # ``new`` keeps the published version, if any: it keeps serving
                    self._fail(p.name, e)
            with self._publish:
                if changed:
                    self.products = new  # the atomic swap: one reference assignment
                    self.generation += 1
                self.states.update(ready)
            self.last_poll = time.time()
            return changed or removed

    def _load(self, name: str, artifact: str, sha: str, shards: int, threshold: float | None) -> dict[str, Any]:
        import ray

        meta = read_meta(artifact, verify=True)
        bid = backbone_id(artifact, sha)
        model = model_source(artifact, meta)  # bytes checked here; the Backbone replica checks F's digest
        bank, index = read_bank(artifact, sha)
        if meta_sha(artifact) != sha:
            raise RuntimeError("artifact changed while loading; retrying on the next poll")
        cfg = meta["config"]
        # the verified version goes to the object store; replicas (also restarted ones) load it from there
        model_src = [ray.put(model)]
        bank_bytes = int(bank.nbytes)
        bank_src = [ray.put(np.ascontiguousarray(bank)), index]
        del model, bank
        bounds = shard_bounds(int(meta["bank_size"]), shards)
        ids = [shard_id(artifact, sha, i, len(bounds) - 1) for i in range(len(bounds) - 1)]
        # a one-shard bank small enough is searched in the Backbone replica (no hop to a BankShard)
        local = len(ids) == 1 and bank_bytes <= self.cfg.local_bank_max_mb * 2**20
        # warm everything before publishing, so the swap never exposes a half-loaded version
        bb = self.backbone.options(multiplexed_model_id=bid)
        pending = [bb.warm.remote(model_src)]
        pending += ([bb.warm_bank.remote(ids[0], bank_src)] if local else
                    [self.shard.options(multiplexed_model_id=m).info.remote(bank_src) for m in ids])
        warmed = [r.result(timeout_s=WARM_TIMEOUT_S) for r in pending]
        return {
            **version_fields(name, artifact, sha, meta, threshold),
            "backbone": meta["backbone"]["name"], "layers": meta["backbone"]["layers"],
            "mean": meta["backbone"]["mean"], "std": meta["backbone"]["std"],
            "bank_size": int(meta["bank_size"]), "feature_dim": int(meta["feature_dim"]),
            "input_size": int(meta["input_size"]), "grid": meta.get("grid"), "data": cfg["data"],
            "num_neighbors": int(cfg["bank"]["num_neighbors"]), "blur_sigma": float(cfg["bank"]["blur_sigma"]),
            "backbone_id": bid, "model_source": model_src, "bank_source": bank_src,
            "index": warmed[1]["index"], "bank_format": meta.get("bank_format", "float32"),
            "bank_bytes": int(sum(w["bytes"] for w in warmed[1:])),
            "shards": [{"id": m, "offset": bounds[i], "size": bounds[i + 1] - bounds[i]} for i, m in enumerate(ids)],
            "search": "backbone" if local else "shards",
            "loaded_at": time.time(), "runtime": "ray",
            "_key": (artifact, sha, shards, threshold, "ray"),
        }

    def _load_edge(self, name: str, path: str, sha: str, files: dict[str, bytes], threshold: float | None,
                   runtime: str) -> dict[str, Any]:
        """An exported model: its files go to the object store, an EdgeScorer replica loads and
        checks them (metadata, weights digest) before the version is published."""
        import ray

        if self.edge is None:
            raise RuntimeError("this service was built without the EdgeScorer deployment")
        mid = edge_model_id(path, sha)
        source = [ray.put(files), Path(path).name, runtime]
        warmed = self.edge.options(multiplexed_model_id=mid).warm.remote(source).result(timeout_s=WARM_TIMEOUT_S)
        meta = warmed["meta"]
        pre = meta["preprocess"]
        return {
            **version_fields(name, path, sha, meta, threshold),
            "backbone": meta.get("backbone"), "layers": meta.get("layers"),
            "mean": pre.get("mean"), "std": pre.get("std"), "preprocess": pre,
            "bank_size": int(meta["bank_size"]), "feature_dim": int(meta["feature_dim"]),
            "input_size": int(meta["input_size"]), "index": f"exact, in the {runtime} graph",
            "bank_format": meta["bank_format"], "bank_bytes": int(sum(len(b) for b in files.values())),
            "shards": [], "runtime": runtime, "edge_id": mid, "edge_source": source,
            "loaded_at": time.time(), "_key": (path, sha, None, threshold, runtime),
        }

    def snapshot(self) -> dict[str, Any]:
        cfg = self.cfg
        token = cfg.effective_token()
        with self._publish:
            generation, products, states = self.generation, self.products, {k: dict(v) for k, v in self.states.items()}
        return {
            "generation": generation, "products": products,
            "states": states, "config_error": self.config_error,
            "last_poll": self.last_poll, "poll_interval_s": cfg.poll_interval_s,
            "settings": {
                "max_upload_bytes": cfg.max_upload_bytes, "max_pixels": cfg.max_pixels,
                "map_array_size": cfg.map_array_size, "snapshot_ttl_s": cfg.snapshot_ttl_s,
                "body_timeout_s": cfg.body_timeout_s, "poll_interval_s": cfg.poll_interval_s,
                "max_batch_images": cfg.max_batch_images, "drift": asdict(cfg.drift), "readiness": cfg.readiness,
                "auth_sha256": hashlib.sha256(token.encode()).hexdigest() if token else None,
            },
        }

    # -- feedback, rollback, versions: written here (one replica) so a product's updates queue up
    # behind one lock; the work runs on a thread, so snapshots (hence scoring) keep flowing
    def _root(self, name: str) -> tuple[str | None, dict[str, Any] | None]:
        for p in resolve_products(self.cfg):
            if p.name == name:
                if p.runtime != "ray":
                    return None, {"status": 409, "error": "feedback_unsupported",
                                  "detail": f"product {name!r} is served from an exported {p.runtime} model; feedback, "
                                            "versions and rollback need its artifact folder (runtime ray)"}
                return str(Path(p.artifact).resolve()), None
        return None, {"status": 404, "error": "unknown_product", "detail": f"no product {name!r}; see GET /v1/products"}

    def _published(self, name: str, number: int) -> dict[str, Any]:
        info = self.products.get(name) or {}
        st = self.states.get(name, {})
        if info.get("artifact_version") == number:
            return {"published": True, "model_version": info["version"]}
        return {"published": False, "model_version": info.get("version"),
                "update_error": (st.get("update_error") or {}).get("kind")}

    def _write(self, name: str, fn) -> dict[str, Any]:
        root, err = self._root(name)
        if err:
            return err
        with self._write_locks.setdefault(name, threading.Lock()):
            try:
                res = fn(root)
            except DataError as e:  # an unreadable image or a refusal: the client's to fix
                from tocoad_ray.bank.feedback import FeedbackRefused

                if isinstance(e, FeedbackRefused):
                    return {"status": 409, "error": "feedback_refused", "detail": str(e), "refused": e.refused}
                se = from_data_error(e, self.cfg.max_pixels)
                name_part = str(e).split(":", 1)[0][:100]
                return {"status": se.status, "error": se.code, "detail": f"{name_part}: {se.detail}"}
            except ArtifactError as e:
                if "has no version" in str(e):
                    return {"status": 404, "error": "unknown_version",
                            "detail": f"product {name!r} has no such version; see GET /v1/products/{name}/versions"}
                log.warning("registry: update of %r failed: %s", name, e)
                return {"status": 500, "error": "update_failed", "detail": "the product's artifact could not be "
                                                                           "updated; the server log has the details"}
            try:
                self.poll_once()  # publish now (warm first, then swap), not at the next poll
            except Exception as e:  # the poll thread retries; the version is written and current
                log.warning("registry: publishing %r after its update failed: %s", name, e)
        return {**res, "product": name, **self._published(name, res["version"])}

    async def feedback(self, name: str, files: list, force: bool = False) -> dict[str, Any]:
        """Add images marked normal to the product's bank as a new version and publish it. The
        images are scored and the bank re-fitted in a Ray task beside this replica (a process with
        the model): the registry itself never imports torch."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from tocoad_ray.bank.feedback import FeedbackRefused

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        task = ray.remote(num_cpus=0, max_retries=0)(feedback_task).options(scheduling_strategy=here)

        def run(root: str) -> dict[str, Any]:
            r = ray.get(task.remote(root, files, bool(force), self.cfg.max_pixels))
            if "refused" in r:
                raise FeedbackRefused(r["refused"], r["images"])
            if "data_error" in r:
                raise DataError(r["data_error"])
            if "artifact_error" in r:
                raise ArtifactError(r["artifact_error"])
            return r["ok"]

        return await asyncio.to_thread(self._write, name, run)

    async def rollback(self, name: str, version: int) -> dict[str, Any]:
        from tocoad_ray.artifact_versions import rollback

        return await asyncio.to_thread(self._write, name, lambda root: rollback(root, int(version)))

    async def versions(self, name: str) -> dict[str, Any]:
        from tocoad_ray.artifact_versions import list_versions, version_path

        root, err = self._root(name)
        if err:
            return err

        def rows():
            out = []
            for r in list_versions(root):
                sha = meta_sha(version_path(root, r["version"]))
                out.append({k: v for k, v in r.items() if k != "dir"} | {"model_version": sha[:12]})
            return out

        try:
            return {"product": name, "versions": await asyncio.to_thread(rows)}
        except ArtifactError as e:
            log.warning("registry: versions of %r: %s", name, e)
            return {"status": 503, "error": "product_unavailable", "detail": "the product's artifact cannot be read"}

    async def reload(self) -> dict[str, Any]:
        """Poll now (tests, operators) and return the new snapshot."""
        await asyncio.to_thread(self.poll_once)  # off the event loop: warming blocks on handles
        return self.snapshot()

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("registry poll thread died")

    def __del__(self):
        self._stop.set()


def feedback_task(root: str, files: list, force: bool, max_pixels: int) -> dict[str, Any]:
    """``add_normal_images`` as a Ray task; its errors come back as data, rebuilt by the registry."""
    from tocoad_ray.bank.feedback import FeedbackRefused, add_normal_images

    try:
        return {"ok": add_normal_images(root, files, force=force, max_pixels=max_pixels)}
    except FeedbackRefused as e:
        return {"refused": str(e), "images": e.refused}
    except DataError as e:
        return {"data_error": str(e)}
    except ArtifactError as e:
        return {"artifact_error": str(e)}


def version_fields(name: str, artifact: str, sha: str, meta: dict[str, Any], threshold: float | None
                   ) -> dict[str, Any]:
    """What every published version carries: identity, provenance and the threshold in force."""
    return {
        "name": name, "artifact": artifact, "sha": sha, "version": sha[:12], "created": meta.get("created"),
        "method": meta.get("method"), "category": meta.get("category"),
        "threshold": float(threshold) if threshold is not None else float(meta["threshold"]),
        "threshold_source": "config" if threshold is not None else "artifact",
        "artifact_threshold": float(meta["threshold"]), "score_stats": meta.get("score_stats", {}),
        "normal_scores": meta.get("normal_scores"),  # the drift watch's reference
    }


def name_key(info: dict[str, Any] | None):
    return None if info is None else info["_key"]
