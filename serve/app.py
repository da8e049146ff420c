"""FastAPI ingress of the scoring service and the application builder (``serve.app:build``).

Request path: read the upload (byte limit) → decode (pixel limit, any mode → RGB) and preprocess
with the product's artifact settings → Backbone deployment (batched, multiplexed per artifact) →
eq. 8/9 and the anomaly map with the library's scoring functions over a ``ShardedSearch`` that
fans out to the product's ``BankShard`` shards.
"""
# no "from __future__ import annotations": FastAPI must see real types on the ingress methods

import asyncio
import base64
import hashlib
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as Fn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from ray import serve
from ray.serve import metrics
from starlette.exceptions import HTTPException as StarletteHTTPException

from tocoad_ray import __version__
from tocoad_ray.bank.scoring import anomaly_maps, patch_scores, reweighted_image_scores
from tocoad_ray.config import DataConfig, from_dict as cfg_from_dict
from tocoad_ray.data import DataError, Preprocess
from tocoad_ray.data.image_io import decode_image_bytes
from tocoad_ray.visualize import encode_png, heatmap_overlay

from .backbone import Backbone
from .config import valid_product_name
from .errors import ServeError, from_data_error
from .registry import Registry, effective_config
from .shards import BankShard, ServeShardClient, ShardedSearch

log = logging.getLogger("ray.serve")
STATIC = Path(__file__).resolve().parent / "static"
MULTIPART_SLACK = 64 << 10  # multipart framing around the file part

app = FastAPI(title="tocoad-ray anomaly scoring", version=__version__,
              description="PatchCore-style memory-bank anomaly scores for industrial images.")


@app.exception_handler(ServeError)
async def _serve_error(_: Request, e: ServeError):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    return JSONResponse({"error": code, "detail": str(e.detail)}, status_code=e.status_code)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError):
    detail = "; ".join(f"{'.'.join(map(str, err.get('loc', ())))}: {err.get('msg')}" for err in e.errors())
    return JSONResponse({"error": "invalid_parameter", "detail": detail}, status_code=400)


def _public(info: dict[str, Any]) -> dict[str, Any]:
    return {
        "product": info["name"], "model_version": info["version"], "created": info["created"],
        "method": info["method"], "backbone": info["backbone"], "layers": info["layers"],
        "bank_size": info["bank_size"], "feature_dim": info["feature_dim"], "input_size": info["input_size"],
        "threshold": info["threshold"], "threshold_source": info["threshold_source"],
        "score_stats": info["score_stats"],
        "shards": [{"offset": s["offset"], "size": s["size"]} for s in info["shards"]],
    }


async def read_upload(request: Request, limit: int) -> bytes:
    """The image bytes: multipart field ``file`` or the raw body; stops reading past ``limit``."""
    cap = limit + MULTIPART_SLACK
    cl = request.headers.get("content-length")
    if cl is not None:
        if not cl.isdigit():
            raise ServeError(400, "bad_request", "invalid Content-Length header")
        if int(cl) > cap:
            raise ServeError(413, "payload_too_large", f"upload of {cl} bytes exceeds the limit of {limit} bytes")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > cap:
            raise ServeError(413, "payload_too_large", f"upload exceeds the limit of {limit} bytes")
    if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        request._body = bytes(buf)  # Starlette's form parser re-reads the cached body
        try:
            form = await request.form()
        except Exception as e:
            raise ServeError(400, "bad_multipart", f"cannot parse multipart body: {e}") from e
        f = form.get("file")
        if f is None:
            raise ServeError(400, "missing_file", "multipart upload has no 'file' field")
        data = await f.read() if hasattr(f, "read") else str(f).encode()
    else:
        data = bytes(buf)
    if len(data) > limit:
        raise ServeError(413, "payload_too_large", f"image of {len(data)} bytes exceeds the limit of {limit} bytes")
    if not data:
        raise ServeError(400, "empty_body", "the request carried no image bytes (raw body or multipart field 'file')")
    return data


def downsample(amap: np.ndarray, size: int) -> np.ndarray:
    """Area-average an [H, W] map to at most size x size cells (keeps the mean level, unlike striding)."""
    h, w = amap.shape
    if max(h, w) <= size:
        return amap
    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    return Fn.adaptive_avg_pool2d(t, (min(h, size), min(w, size)))[0, 0].numpy()


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, registry, backbone, shard):
        self.registry, self.backbone, self.shard = registry, backbone, shard
        self._snap: dict[str, Any] | None = None
        self._snap_t = 0.0
        self._prep: dict[str, Preprocess] = {}
        # scoring waits on shard handles with .result(): keep it on threads, off the event loop
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="score")
        self.m_requests = metrics.Counter("tocoad_score_requests", "scoring requests by product and HTTP status",
                                          tag_keys=("product", "status"))
        self.m_errors = metrics.Counter("tocoad_score_errors", "failed scoring requests by product and error code",
                                        tag_keys=("product", "error"))
        self.m_latency = metrics.Histogram("tocoad_score_latency_ms", "scoring latency (ms)",
                                           boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000],
                                           tag_keys=("product",))

    async def snapshot(self, force: bool = False) -> dict[str, Any]:
        now = time.monotonic()
        ttl = self._snap["settings"]["snapshot_ttl_s"] if self._snap else 0.0
        if force or self._snap is None or now - self._snap_t > ttl:
            try:
                self._snap = await self.registry.snapshot.remote()
            except Exception as e:
                if self._snap is None:
                    raise ServeError(503, "registry_unavailable", f"product registry unreachable: {e}") from e
            self._snap_t = now
        return self._snap

    def _preprocess(self, info: dict[str, Any]) -> Preprocess:
        p = self._prep.get(info["sha"])
        if p is None:
            p = Preprocess(cfg_from_dict(DataConfig, info["data"]), info["mean"], info["std"])
            self._prep = {**self._prep, info["sha"]: p} if len(self._prep) < 64 else {info["sha"]: p}
        return p

    @staticmethod
    def _check_auth(request: Request, settings: dict[str, Any]) -> None:
        want = settings.get("auth_sha256")
        if not want:
            return
        h = request.headers.get("authorization", "")
        scheme, _, token = h.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ServeError(401, "unauthorized", "missing bearer token (Authorization: Bearer <token>)",
                             {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(hashlib.sha256(token.strip().encode()).hexdigest(), want):
            raise ServeError(401, "unauthorized", "invalid bearer token", {"WWW-Authenticate": "Bearer"})

    @app.get("/", include_in_schema=False)
    async def index(self):
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/healthz", summary="liveness and loaded product count")
    async def healthz(self):
        snap = await self.snapshot()
        return {"status": "ok", "products": len(snap["products"]), "generation": snap["generation"],
                "errors": snap["errors"], "version": __version__}

    @app.get("/v1/products", summary="loaded products: version, backbone, bank size, shards, threshold")
    async def products(self):
        snap = await self.snapshot()
        return {"generation": snap["generation"], "products": [_public(i) for i in snap["products"].values()],
                "errors": snap["errors"], "auth_required": bool(snap["settings"]["auth_sha256"])}

    @app.post("/v1/products/{product}/score", summary="score one image (multipart field 'file' or raw body)")
    async def score(self, product: str, request: Request, map: str | None = None, threshold: float | None = None):
        t0 = time.perf_counter()
        tag = product if valid_product_name(product) else "_invalid"
        try:
            out = await self._score(product, request, map, threshold)
        except ServeError as e:
            tag = tag if e.status != 404 else "_unknown"  # don't let arbitrary names become metric tags
            self.m_requests.inc(tags={"product": tag, "status": str(e.status)})
            self.m_errors.inc(tags={"product": tag, "error": e.code})
            raise
        except Exception as e:  # a replica died mid-request, a timeout, ...: report, keep serving
            log.exception("scoring failed")
            self.m_requests.inc(tags={"product": tag, "status": "503"})
            self.m_errors.inc(tags={"product": tag, "error": "backend_unavailable"})
            raise ServeError(503, "backend_unavailable", f"{type(e).__name__}: {e}"[:500]) from e
        self.m_requests.inc(tags={"product": tag, "status": "200"})
        self.m_latency.observe(1000 * (time.perf_counter() - t0), tags={"product": tag})
        return out

    async def _score(self, product: str, request: Request, map_mode: str | None, threshold: float | None):
        if not valid_product_name(product):
            raise ServeError(400, "invalid_product", "product names are letters, digits, '_', '.', '-' (max 64)")
        if map_mode not in (None, "", "png", "array", "none"):
            raise ServeError(400, "invalid_parameter", f"map must be 'png' or 'array', got {map_mode!r}")
        if threshold is not None and not np.isfinite(threshold):
            raise ServeError(400, "invalid_parameter", "threshold must be a finite number")
        snap = await self.snapshot()
        self._check_auth(request, snap["settings"])
        info = snap["products"].get(product)
        if info is None:
            snap = await self.snapshot(force=True)  # maybe just added
            info = snap["products"].get(product)
        if info is None:
            err = snap["errors"].get(product)
            if err:
                raise ServeError(503, "product_unavailable", f"product {product!r} failed to load: {err}")
            raise ServeError(404, "unknown_product", f"no product {product!r}; see GET /v1/products")
        settings = snap["settings"]
        data = await read_upload(request, settings["max_upload_bytes"])
        loop = asyncio.get_running_loop()
        pre = self._preprocess(info)

        def prepare() -> torch.Tensor:
            try:
                return pre.image(decode_image_bytes(data, settings["max_pixels"]))
            except DataError as e:
                raise from_data_error(e) from e

        x = await loop.run_in_executor(self._pool, prepare)
        rows, (h, w) = await self.backbone.options(multiplexed_model_id=info["backbone_id"]).embed.remote(x.numpy())
        return await loop.run_in_executor(self._pool, self._finish, info, x, rows, (h, w), map_mode, threshold,
                                          settings)

    def _finish(self, info, x, rows, grid, map_mode, threshold, settings) -> dict[str, Any]:
        """Eq. 8/9 and the map over the sharded bank — the same calls as MemoryBank.score/Detector.score."""
        search = ShardedSearch([ServeShardClient(self.shard, s["id"]) for s in info["shards"]],
                               [s["offset"] for s in info["shards"]], info["feature_dim"])
        s_prime, nn = patch_scores(search, rows)
        score = float(reweighted_image_scores(search, rows, s_prime, nn, 1, info["num_neighbors"])[0])
        thr = float(threshold) if threshold is not None else info["threshold"]
        out = {"product": info["name"], "score": score, "anomalous": bool(score >= thr), "threshold": thr,
               "threshold_source": "request" if threshold is not None else info["threshold_source"],
               "model_version": info["version"], "model_created": info["created"],
               "shards": len(info["shards"])}
        if map_mode in ("png", "array"):
            h, w = grid
            amap = anomaly_maps(s_prime.reshape(1, h, w), x.shape[-1], info["blur_sigma"])[0]
            if map_mode == "png":
                pre = self._preprocess(info)
                png = encode_png(heatmap_overlay(pre.denormalize(x), amap, info["score_stats"], thr))
                out["map_png"] = base64.b64encode(png).decode()
            else:
                small = downsample(amap, settings["map_array_size"])
                out["map"] = np.round(small, 4).tolist()
                out["map_shape"] = list(small.shape)
                out["map_max"] = float(amap.max())
        return out


def build_app(args: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None):
    """The Serve application: Ingress → (Registry, Backbone, BankShard), sized from the config."""
    args, overrides = dict(args or {}), dict(overrides or {})
    cfg = effective_config(args, overrides)
    b, s = cfg.backbone, cfg.shards
    backbone = Backbone.options(
        autoscaling_config={"min_replicas": b.min_replicas, "max_replicas": b.max_replicas,
                            "target_ongoing_requests": b.target_ongoing_requests},
        max_ongoing_requests=b.max_ongoing_requests,
        ray_actor_options={"num_cpus": b.num_cpus, "num_gpus": b.num_gpus},
    ).bind(b.max_batch_size, b.batch_wait_timeout_s, b.torch_threads)
    shard = BankShard.options(
        autoscaling_config={"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                            "target_ongoing_requests": s.target_ongoing_requests},
        max_ongoing_requests=s.max_ongoing_requests,
        ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
    ).bind()
    registry = Registry.options(num_replicas=1, ray_actor_options={"num_cpus": cfg.registry.num_cpus}
                                ).bind(backbone, shard, args, overrides)
    return Ingress.options(num_replicas=cfg.ingress.num_replicas, max_ongoing_requests=cfg.ingress.max_ongoing_requests,
                           ray_actor_options={"num_cpus": cfg.ingress.num_cpus}).bind(registry, backbone, shard)


def build(args: dict[str, Any]):
    """Application builder for ``serve deploy`` / ``serve run serve.app:build`` (args = the service config)."""
    return build_app(args)
