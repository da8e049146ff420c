"""FastAPI ingress of the scoring service and the application builder (``serve.app:build``).

Request path: read the upload (byte limit) → the Backbone deployment with the upload's bytes
(batched across requests, multiplexed per artifact): decode (pixel limit, any mode → RGB) and
preprocess with the product's artifact settings, F, one k-NN fan-out to the product's
``BankShard`` shards, eq. 8/9 and the anomaly map → the answer. The ingress never runs a model and
imports neither torch nor timm (exported models: it decodes with numpy for the EdgeScorer).
"""
# no "from __future__ import annotations": FastAPI must see real types on the ingress methods

import asyncio
import collections
import hashlib
import hmac
import logging
import time
import uuid
from dataclasses import asdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from ray import serve
from ray.exceptions import TaskCancelledError
from ray.serve import metrics
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from swagger_ui_bundle import swagger_ui_path

from tocoad_ray import __version__
from tocoad_ray.data import DataError
from tocoad_ray.data.image_io import decode_image_bytes
from tocoad_ray.drift import DriftWindow, reference_scores

from .config import valid_product_name
from .errors import ClientGone, ServeError, from_data_error
from .results import downsample, result  # noqa: F401 - downsample: part of this module's interface
from .sources import scoring_context

log = logging.getLogger("ray.serve")
STATIC = Path(__file__).resolve().parent / "static"
MULTIPART_SLACK = 64 << 10  # multipart framing around the file part
DOCS_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")

app = FastAPI(title="tocoad-ray anomaly scoring", version=__version__,
              description="PatchCore-style memory-bank anomaly scores for industrial images.",
              docs_url=None, redoc_url=None)  # /docs is served from local assets below (offline networks)


def request_id() -> str:
    """Ray Serve's id of this request (the proxy returns it as X-Request-ID, its logs carry it)."""
    try:
        rid = serve.context._get_serve_request_context().request_id
    except Exception:  # noqa: BLE001 - outside a Serve replica
        rid = ""
    return rid or uuid.uuid4().hex


def error_response(e: ServeError, rid: str | None = None) -> JSONResponse:
    rid = rid or request_id()  # Serve's proxy sends the same id as the X-Request-ID header
    return JSONResponse(e.body(rid), status_code=e.status, headers=e.headers)


@app.exception_handler(ServeError)
async def _serve_error(_: Request, e: ServeError):
    return error_response(e)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    detail = {404: "no such route; see /docs", 405: "method not allowed on this route"}.get(e.status_code, "HTTP error")
    return error_response(ServeError(e.status_code, code, detail))


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError):
    detail = "; ".join(f"{'.'.join(map(str, err.get('loc', ())))}: {err.get('msg')}" for err in e.errors())
    return error_response(ServeError(400, "invalid_parameter", detail[:300]))


@app.exception_handler(Exception)
async def _unexpected(_: Request, e: Exception):
    rid = request_id()
    log.error("request %s failed: %s", rid, e, exc_info=e)
    return error_response(ServeError(500, "internal_error", f"the server failed on this request; quote request id "
                                                           f"{rid} to the operator"), rid)


def _public(info: dict[str, Any]) -> dict[str, Any]:
    return {
        "product": info["name"], "model_version": info["version"], "created": info["created"],
        "method": info["method"], "backbone": info["backbone"], "layers": info["layers"],
        "bank_size": info["bank_size"], "feature_dim": info["feature_dim"], "input_size": info["input_size"],
        "index": info["index"], "bank_format": info["bank_format"], "bank_bytes_in_memory": info["bank_bytes"],
        "threshold": info["threshold"], "threshold_source": info["threshold_source"],
        "score_stats": info["score_stats"],
        "shards": [{"offset": s["offset"], "size": s["size"]} for s in info["shards"]],
        # where the k-NN runs: "backbone" (a small one-shard bank, beside F), "shards", or the export's runtime
        "search_in": info.get("search", info.get("runtime")),
    }


def _state(name: str, st: dict[str, Any]) -> dict[str, Any]:
    """A product's public state: ready / loading / unavailable with the kind of failure (no paths)."""
    out = {"product": name, "state": st["state"], "since": st.get("since")}
    if st["state"] == "unavailable":
        out["reason"] = {"kind": st["kind"], "message": st["message"]}
    if st.get("update_error"):
        out["update_error"] = dict(st["update_error"])  # a newer version failed; the published one serves
    return out


def is_ready(states: list[str], mode: str = "healthy") -> bool:
    """Readiness from the products' states: strict needs every product ready; healthy needs none
    still loading and at least one ready (no products: ready, there is nothing to wait for)."""
    if not states:
        return True
    if mode == "strict":
        return all(s == "ready" for s in states)
    return "loading" not in states and "ready" in states


def _errors(snap: dict[str, Any]) -> dict[str, dict[str, str]]:
    out = {n: {"kind": st["kind"], "message": st.get("message") or st["update_error"]["message"]}
           for n, st in snap["states"].items() if st.get("kind")}
    if snap.get("config_error"):
        out["_config"] = {k: snap["config_error"][k] for k in ("kind", "message")}
    return out


async def read_upload(request: Request, limit: int, timeout_s: float) -> bytes:
    """The image bytes: multipart field ``file`` (exactly one) or the raw body; stops reading past
    ``limit`` bytes or ``timeout_s`` seconds."""
    cap = limit + MULTIPART_SLACK
    cl = request.headers.get("content-length")
    if cl is not None:
        if not cl.isdigit():
            raise ServeError(400, "bad_request", "invalid Content-Length header")
        if int(cl) > cap:
            raise ServeError(413, "payload_too_large", f"upload of {cl} bytes exceeds the limit of {limit} bytes")
    buf = bytearray()

    async def receive() -> None:
        async for chunk in request.stream():
            buf.extend(chunk)
            if len(buf) > cap:
                raise ServeError(413, "payload_too_large", f"upload exceeds the limit of {limit} bytes")

    try:
        await asyncio.wait_for(receive(), timeout_s)
    except asyncio.TimeoutError:
        raise ServeError(408, "body_timeout", f"the request body did not arrive within {timeout_s:g} s "
                                              "(body_timeout_s); send it at once", {"Connection": "close"}) from None
    except (ClientDisconnect, TaskCancelledError):  # Serve cancels the body's fetch when the client leaves
        raise ClientGone() from None
    if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        request._body = bytes(buf)  # Starlette's form parser re-reads the cached body
        try:
            form = await request.form()
        except Exception as e:
            log.info("request %s: unparsable multipart body: %s", request_id(), e)
            raise ServeError(400, "bad_multipart", "the multipart body cannot be parsed") from e
        files = form.getlist("file")
        if not files:
            raise ServeError(400, "missing_file", "multipart upload has no 'file' field")
        if len(files) > 1:
            raise ServeError(400, "ambiguous_upload", f"multipart upload has {len(files)} 'file' fields; send one "
                                                      "image per request")
        f = files[0]
        data = await f.read() if hasattr(f, "read") else str(f).encode()
    else:
        data = bytes(buf)
    if len(data) > limit:
        raise ServeError(413, "payload_too_large", f"image of {len(data)} bytes exceeds the limit of {limit} bytes")
    if not data:
        raise ServeError(400, "empty_body", "the request carried no image bytes (raw body or multipart field 'file')")
    return data


async def read_uploads(request: Request, limit: int, max_images: int, timeout_s: float) -> list[tuple[str, bytes]]:
    """A batch: multipart fields ``files`` (or ``file``), at most ``max_images``, each at most
    ``limit`` bytes; returns (filename, bytes) in order."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise ServeError(415, "multipart_required", "send the images as multipart fields named 'files'")
    cap = max_images * (limit + MULTIPART_SLACK)
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > cap:
        raise ServeError(413, "payload_too_large", f"a batch of {cl} bytes exceeds {max_images} × {limit} bytes")
    buf = bytearray()

    async def receive() -> None:
        async for chunk in request.stream():
            buf.extend(chunk)
            if len(buf) > cap:
                raise ServeError(413, "payload_too_large", f"the batch exceeds {max_images} × {limit} bytes")

    try:
        await asyncio.wait_for(receive(), timeout_s)
    except asyncio.TimeoutError:
        raise ServeError(408, "body_timeout", f"the request body did not arrive within {timeout_s:g} s "
                                              "(body_timeout_s)", {"Connection": "close"}) from None
    except (ClientDisconnect, TaskCancelledError):  # Serve cancels the body's fetch when the client leaves
        raise ClientGone() from None
    request._body = bytes(buf)
    try:
        form = await request.form(max_files=max_images + 1, max_fields=max_images + 8)
    except Exception as e:
        log.info("request %s: unparsable multipart body: %s", request_id(), e)
        raise ServeError(400, "bad_multipart", "the multipart body cannot be parsed (or has too many parts)") from e
    parts = form.getlist("files") + form.getlist("file")
    if not parts:
        raise ServeError(400, "missing_file", "the batch has no 'files' fields")
    if len(parts) > max_images:
        raise ServeError(413, "too_many_images", f"{len(parts)} images in one request; this service takes at most "
                                                 f"{max_images} (max_batch_images)")
    out = []
    for f in parts:
        data = await f.read() if hasattr(f, "read") else str(f).encode()
        out.append((getattr(f, "filename", None) or "", data))
    return out


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, registry, backbone, shard, edge=None):
        self.registry, self.backbone, self.shard, self.edge = registry, backbone, shard, edge
        self._snap: dict[str, Any] | None = None
        self._snap_t = 0.0
        self._prep: dict[str, Any] = {}  # version -> ImagePreprocess (exported models)
        self._ctx: dict[str, tuple] = {}  # product -> (published version's key, its scoring context)
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="decode")  # exported models' decode
        self.m_requests = metrics.Counter("tocoad_score_requests", "scoring requests by product and HTTP status",
                                          tag_keys=("product", "status"))
        self.m_errors = metrics.Counter("tocoad_score_errors", "failed scoring requests by product and error code",
                                        tag_keys=("product", "error"))
        self.counts: collections.Counter = collections.Counter()
        self.m_latency = metrics.Histogram("tocoad_score_latency_ms", "scoring latency (ms)",
                                           boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000],
                                           tag_keys=("product",))
        # drift watch: per product, this replica's last scores vs the artifact's normal scores
        self._drift: dict[str, tuple[tuple, DriftWindow]] = {}
        self._drift_gauged: dict[str, float] = {}  # product -> when its drift gauges were last set
        self._drift_pending: set[str] = set()  # products with a gauge update scheduled
        self.m_drift = {k: metrics.Gauge(f"tocoad_drift_{k}", help_, tag_keys=("product",)) for k, help_ in (
            ("ks", "KS statistic D: window scores vs the artifact's leave-one-out normal scores"),
            ("ks_pvalue", "p-value of the KS shift"),
            ("share_above", "share of the window's scores at or above the threshold"),
            ("alarm", "1 when the shift or the share above threshold is significant (drift.alpha)"),
            ("window_images", "scores in the drift window"))}

    def _count(self, tag: str, status: str, error: str | None = None) -> None:
        self.m_requests.inc(tags={"product": tag, "status": status})
        self.counts[status] += 1
        if error:
            self.m_errors.inc(tags={"product": tag, "error": error})
            self.counts[error] += 1

    async def stats(self) -> dict[str, int]:
        """This replica's request counts by HTTP status and error code (the metrics carry the same)."""
        return dict(self.counts)

    async def snapshot(self, force: bool = False) -> dict[str, Any]:
        now = time.monotonic()
        ttl = self._snap["settings"]["snapshot_ttl_s"] if self._snap else 0.0
        if force or self._snap is None or now - self._snap_t > ttl:
            try:
                self._snap = await self.registry.snapshot.remote()
            except Exception as e:
                if self._snap is None:
                    log.error("request %s: registry unreachable: %s", request_id(), e)
                    raise ServeError(503, "registry_unavailable", "the product registry is not reachable yet; retry "
                                                                  "shortly", {"Retry-After": "2"}) from e
            self._snap_t = now
        return self._snap

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

    @app.get("/docs", include_in_schema=False)
    async def docs(self):
        # Swagger UI from the swagger-ui-bundle package: no CDN, works on an offline factory network
        return get_swagger_ui_html(openapi_url="/openapi.json", title=app.title + " - docs",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")

    @app.get("/docs-assets/{name}", include_in_schema=False)
    async def docs_assets(self, name: str):
        if name not in DOCS_ASSETS:
            raise ServeError(404, "not_found", "no such docs asset")
        return FileResponse(Path(swagger_ui_path) / name)

    @app.get("/healthz", summary="liveness: the service answers (readiness is /readyz)")
    async def healthz(self):
        snap = await self.snapshot()
        states = snap["states"]
        return {"status": "ok", "ready": all(s["state"] == "ready" for s in states.values()),
                "products": len(snap["products"]), "generation": snap["generation"], "version": __version__}

    @app.get("/readyz", summary="readiness: 200 when the healthy products can be scored (config "
                                "readiness: healthy, the default) or when every product can (strict), else 503")
    async def readyz(self):
        snap = await self.snapshot(force=True)
        states = [_state(n, st) for n, st in sorted(snap["states"].items())]
        mode = snap["settings"].get("readiness", "healthy")
        ready = is_ready([s["state"] for s in states], mode)
        body = {"status": "ready" if ready else "not_ready", "mode": mode, "products": states}
        if not ready:
            retry = str(max(1, int(np.ceil(snap["settings"]["poll_interval_s"]))))
            return JSONResponse(body, status_code=503, headers={"Retry-After": retry})
        return body

    def _observe(self, info: dict[str, Any], settings: dict[str, Any], scores) -> None:
        """Feed the product's drift window (a new version or threshold starts a new window)."""
        try:
            d = settings.get("drift") or {}
            key = (info["sha"], info["threshold"], tuple(sorted(d.items())))
            cur = self._drift.get(info["name"])
            if cur is None or cur[0] != key:
                ref = reference_scores({"normal_scores": info.get("normal_scores"), "score_stats": info["score_stats"]})
                cur = (key, DriftWindow(ref, info["threshold"], **d))
                self._drift[info["name"]] = cur
            cur[1].push(scores)
            # the gauges at most once a second per product (a KS test and five metric records per
            # request cost the ingress more than routing the request); the last change is never lost
            name = info["name"]
            wait = self._drift_gauged.get(name, -1.0) + 1.0 - time.monotonic()
            if wait <= 0:
                self._gauge_drift(name)
            elif name not in self._drift_pending:
                self._drift_pending.add(name)
                asyncio.get_running_loop().call_later(wait, self._gauge_drift, name)
        except Exception as e:  # noqa: BLE001 - the watch must never fail a scored request
            log.warning("drift watch for %r failed: %s", info.get("name"), e)

    def _gauge_drift(self, name: str) -> None:
        self._drift_pending.discard(name)
        cur = self._drift.get(name)
        if cur is None:
            return
        self._drift_gauged[name] = time.monotonic()
        st, tags = cur[1].stats(), {"product": name}
        for k, v in (("ks", st["ks"]), ("ks_pvalue", st["ks_pvalue"]), ("share_above", st["share_above"]),
                     ("alarm", float(st["alarm"])), ("window_images", st["images"])):
            if v is not None:
                self.m_drift[k].set(float(v), tags=tags)

    def _drift_view(self, name: str, info: dict[str, Any]) -> dict[str, Any] | None:
        cur = self._drift.get(name)
        if cur is None or cur[0][0] != info["sha"]:  # nothing scored on the published version yet
            return None
        w = cur[1]
        return {**w.stats(), "trend": [list(t) for t in w.trend]}

    @app.get("/v1/products", summary="every product with its state; loaded ones with version, bank, shards, threshold, "
                                     "drift")
    async def products(self):
        snap = await self.snapshot()
        loaded = snap["products"]
        for gone in set(self._drift) - set(loaded):
            del self._drift[gone]
        return {"generation": snap["generation"],
                "products": [_public(i) | {"state": "ready", "drift": self._drift_view(n, i),
                                           "artifact_version": i.get("artifact_version")} for n, i in loaded.items()],
                "states": [_state(n, st) for n, st in sorted(snap["states"].items())],
                "errors": _errors(snap), "auth_required": bool(snap["settings"]["auth_sha256"])}

    @app.post("/v1/products/{product}/score", summary="score one image (multipart field 'file' or raw body)")
    async def score(self, product: str, request: Request, map: str | None = None, threshold: float | None = None):
        t0 = time.perf_counter()
        tag = product if valid_product_name(product) else "_invalid"
        rid = request_id()
        try:
            out = await self._score(product, request, map, threshold)
        except ServeError as e:
            tag = tag if e.status != 404 else "_unknown"  # don't let arbitrary names become metric tags
            self._count(tag, str(e.status), e.code)
            raise
        except ClientGone:  # the client left: nobody to answer, nothing failed on our side
            log.info("request %s: client disconnected before its upload arrived", rid)
            self._count(tag, "499", "client_disconnected")
            return Response(status_code=499)
        except asyncio.CancelledError:  # Serve's proxy cancels the request when its client disconnects
            log.info("request %s: client disconnected; request cancelled", rid)
            self._count(tag, "499", "client_disconnected")
            raise
        except Exception as e:  # a replica died mid-request, a timeout, ...: log it all, answer without internals
            log.error("request %s: scoring %r failed: %s: %s", rid, tag, type(e).__name__, e, exc_info=e)
            self._count(tag, "503", "backend_unavailable")
            raise ServeError(503, "backend_unavailable", "a scoring backend failed or restarted during this request; "
                                                         "retry it", {"Retry-After": "1"}) from e
        self._count(tag, "200")
        self.m_latency.observe(1000 * (time.perf_counter() - t0), tags={"product": tag})
        return out

    async def _product(self, product: str, request: Request, map_mode: str | None, threshold: float | None):
        """Validate the request line and find the product's published version (or say why not)."""
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
            st = snap["states"].get(product)
            if st is None:
                raise ServeError(404, "unknown_product", f"no product {product!r}; see GET /v1/products")
            retry = {"Retry-After": str(max(1, int(np.ceil(snap["settings"]["poll_interval_s"]))))}
            if st["state"] != "unavailable":  # loading (or published in the very next snapshot)
                raise ServeError(503, "product_loading", f"product {product!r} is still loading; retry shortly", retry)
            raise ServeError(503, "product_unavailable", f"product {product!r} is unavailable ({st['kind']}): "
                                                         f"{st['message']}", retry)
        return info, snap["settings"]

    # -- products served from an exported model (runtime onnx / openvino) -------------------------
    def _edge_preprocess(self, info):
        """The model's own numpy preprocessing (as an edge box runs it)."""
        from tocoad_ray.export.preprocess import ImagePreprocess

        p = self._prep.get(info["sha"])
        if p is None:
            p = ImagePreprocess.from_dict(info["preprocess"])
            self._prep = {**self._prep, info["sha"]: p} if len(self._prep) < 64 else {info["sha"]: p}
        return p

    def _prepare_edge(self, info, settings, data: bytes) -> np.ndarray:
        try:
            return self._edge_preprocess(info)(decode_image_bytes(data, settings["max_pixels"]))
        except DataError as e:
            raise from_data_error(e, settings["max_pixels"]) from e

    async def _score_edge(self, info, x: np.ndarray) -> tuple[float, np.ndarray]:
        return await self.edge.options(multiplexed_model_id=info["edge_id"]).score.remote(x, info["edge_source"])

    def _finish_edge(self, info, xs, scored, map_mode, threshold, settings) -> list[dict[str, Any]]:
        pre = self._edge_preprocess(info)

        def display(x: np.ndarray) -> np.ndarray:
            t = np.clip(x * pre.std + pre.mean, 0.0, 1.0)
            return (t.transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8)

        return [result(info, score, lambda amap=amap: amap, lambda x=x: display(x), map_mode, threshold, settings)
                for x, (score, amap) in zip(xs, scored)]

    def _context(self, info: dict[str, Any]) -> dict[str, Any]:
        """The published version's scoring context, built once per version (not per request)."""
        key = (info["sha"], info["threshold"], tuple(s["id"] for s in info["shards"]))
        cur = self._ctx.get(info["name"])
        if cur is None or cur[0] != key:
            cur = (key, scoring_context(info))
            self._ctx[info["name"]] = cur
        return cur[1]

    async def _score_remote(self, info, settings, data: bytes, map_mode, threshold) -> dict[str, Any]:
        """One upload through the Backbone deployment; an image the client must fix raises its ServeError."""
        out = await self.backbone.options(multiplexed_model_id=info["backbone_id"]).score.remote(
            data, self._context(info), info["model_source"], map_mode, threshold, settings)
        if "error" in out:
            raise ServeError(out["status"], out["error"], out["detail"])
        return out

    async def _score(self, product: str, request: Request, map_mode: str | None, threshold: float | None):
        info, settings = await self._product(product, request, map_mode, threshold)
        self.counts["uploads_started"] += 1  # stats(): this replica is reading a body (a client may leave now)
        data = await read_upload(request, settings["max_upload_bytes"], settings["body_timeout_s"])
        loop = asyncio.get_running_loop()
        if info.get("runtime", "ray") != "ray":
            x = await loop.run_in_executor(self._pool, self._prepare_edge, info, settings, data)
            scored = await self._score_edge(info, x)
            out = self._finish_edge(info, [x], [scored], map_mode, threshold, settings)
        else:
            out = [await self._score_remote(info, settings, data, map_mode, threshold)]
        self._observe(info, settings, [out[0]["score"]])
        return out[0]

    @app.post("/v1/products/{product}/score-batch",
              summary="score up to max_batch_images images in one request (multipart fields 'files')")
    async def score_batch(self, product: str, request: Request, map: str | None = None,
                          threshold: float | None = None):
        """Every image gets an answer in ``results`` (same order): its score, or its own error while
        the others are scored. One search fan-out covers the whole batch."""
        tag = product if valid_product_name(product) else "_invalid"
        try:
            info, settings = await self._product(product, request, map, threshold)
            files = await read_uploads(request, settings["max_upload_bytes"], settings["max_batch_images"],
                                       settings["body_timeout_s"])
        except ServeError as e:
            self._count(tag if e.status != 404 else "_unknown", str(e.status), e.code)
            raise
        except (ClientGone, asyncio.CancelledError):
            self._count(tag, "499", "client_disconnected")
            raise
        loop = asyncio.get_running_loop()
        results: list[dict[str, Any]] = [{"index": i, "filename": name} for i, (name, _) in enumerate(files)]
        edge = info.get("runtime", "ray") != "ray"
        todo: dict[int, Any] = {}  # index -> preprocessed array (exported models) or the upload's bytes
        for i, (_, data) in enumerate(files):
            try:
                if len(data) > settings["max_upload_bytes"]:
                    raise ServeError(413, "payload_too_large", f"image of {len(data)} bytes exceeds the limit of "
                                                               f"{settings['max_upload_bytes']} bytes")
                todo[i] = await loop.run_in_executor(self._pool, self._prepare_edge, info, settings, data) if edge \
                    else data
            except ServeError as e:
                results[i].update(error=e.code, detail=e.detail)
        try:
            if edge:  # the replica batches these into one graph run
                good = sorted(todo)
                scored_edge = await asyncio.gather(*(self._score_edge(info, todo[i]) for i in good))
                scored = self._finish_edge(info, [todo[i] for i in good], scored_edge, map, threshold, settings)
            else:  # one call: the Backbone replica batches the images (with other clients' ones)
                answers = await self.backbone.options(multiplexed_model_id=info["backbone_id"]).score_many.remote(
                    [todo[i] for i in sorted(todo)], self._context(info), info["model_source"], map, threshold,
                    settings) if todo else []
                good, scored = [], []
                for i, a in zip(sorted(todo), answers):
                    if "error" in a:
                        results[i].update(error=a["error"], detail=a["detail"])
                    else:
                        good.append(i)
                        scored.append(a)
        except Exception as e:
            rid = request_id()
            log.error("request %s: batch scoring %r failed: %s: %s", rid, tag, type(e).__name__, e, exc_info=e)
            self._count(tag, "503", "backend_unavailable")
            raise ServeError(503, "backend_unavailable", "a scoring backend failed or restarted during this request; "
                                                         "retry it", {"Retry-After": "1"}) from e
        for i, r in zip(good, scored):
            results[i].update(r)
        if scored:
            self._observe(info, settings, [r["score"] for r in scored])
        self._count(tag, "200")
        return {"product": info["name"], "model_version": info["version"], "n": len(results),
                "n_failed": len(results) - len(good), "results": results}

    # -- operator feedback: the bank grows as a new artifact version (the Registry writes it) ---------
    async def _writable(self, product: str, request: Request) -> tuple[dict[str, Any], dict[str, Any]]:
        info, settings = await self._product(product, request, None, None)  # name, auth, loaded
        if info.get("runtime", "ray") != "ray":
            raise ServeError(409, "feedback_unsupported", f"product {product!r} is served from an exported model; "
                                                          "feedback and rollback need its artifact (runtime ray)")
        return info, settings

    @staticmethod
    def _answer(res: dict[str, Any]) -> dict[str, Any]:
        if "error" in res:
            raise ServeError(res["status"], res["error"], res["detail"])
        return res

    @app.post("/v1/products/{product}/feedback",
              summary="mark images as normal (multipart 'file' / 'files', or a raw body): the bank grows as a new "
                      "version, served once loaded")
    async def feedback(self, product: str, request: Request, verdict: str = "normal", force: bool = False):
        """``verdict=normal`` only; ``force=true`` adds images scoring above refuse_factor × threshold.
        Scoring goes on meanwhile (the new version is warmed before it is swapped in); feedback for
        one product is applied one request at a time."""
        tag = product if valid_product_name(product) else "_invalid"
        try:
            if verdict != "normal":
                raise ServeError(400, "invalid_parameter", f"verdict must be 'normal' (an image checked as free of "
                                                           f"defects), got {verdict!r}")
            info, settings = await self._writable(product, request)
            if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
                files = await read_uploads(request, settings["max_upload_bytes"], settings["max_batch_images"],
                                           settings["body_timeout_s"])
            else:
                files = [("upload", await read_upload(request, settings["max_upload_bytes"], settings["body_timeout_s"]))]
            files = [((Path(n).name.replace(":", "_")[:100] or f"upload-{i}"), d) for i, (n, d) in enumerate(files)]
            res = self._answer(await self.registry.feedback.remote(product, files, bool(force)))
        except ServeError as e:
            self._count(tag if e.status != 404 else "_unknown", str(e.status), e.code)
            raise
        except ClientGone:
            self._count(tag, "499", "client_disconnected")
            return Response(status_code=499)
        self._count(tag, "200")
        await self.snapshot(force=True)
        return res

    @app.post("/v1/products/{product}/rollback", summary="make an earlier (or later) version of the product current")
    async def rollback(self, product: str, request: Request, version: int):
        if version < 1:
            raise ServeError(400, "invalid_parameter", "version must be >= 1 (1 is the fitted artifact)")
        await self._writable(product, request)
        res = self._answer(await self.registry.rollback.remote(product, version))
        await self.snapshot(force=True)
        return res

    @app.get("/v1/products/{product}/versions", summary="the product's artifact versions; which is current")
    async def versions(self, product: str):
        if not valid_product_name(product):
            raise ServeError(400, "invalid_product", "product names are letters, digits, '_', '.', '-' (max 64)")
        return self._answer(await self.registry.versions.remote(product))

def build_app(args: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None):
    """The Serve application: Ingress → (Registry, Backbone, BankShard, EdgeScorer), sized from the config."""
    args, overrides = dict(args or {}), dict(overrides or {})
    from .backbone import Backbone  # the model side: imported where the app is built, not in the ingress
    from .edge import EdgeScorer
    from .registry import Registry, effective_config
    from .shards import BankShard

    cfg = effective_config(args, overrides)
    logs = {"enable_access_log": bool(cfg.access_log)}

    def sized(deployment, d):  # autoscaling and resources of one deployment, from its config section
        return deployment.options(
            autoscaling_config={"min_replicas": d.min_replicas, "max_replicas": d.max_replicas,
                                "target_ongoing_requests": d.target_ongoing_requests, **asdict(d.autoscaling)},
            max_ongoing_requests=d.max_ongoing_requests, logging_config=logs,
            ray_actor_options={"num_cpus": d.num_cpus, "num_gpus": d.num_gpus})

    b, s, e = cfg.backbone, cfg.shards, cfg.edge
    shard = sized(BankShard, s).bind(s.faiss_threads)
    backbone = sized(Backbone, b).bind(b.max_batch_size, b.batch_wait_timeout_s, b.torch_threads, shard)
    edge = sized(EdgeScorer, e).bind(e.max_batch_size, e.batch_wait_timeout_s, e.torch_threads)
    # the registry also writes feedback versions: long calls must not starve the snapshot calls
    registry = Registry.options(num_replicas=1, max_ongoing_requests=cfg.registry.max_ongoing_requests,
                                logging_config=logs, ray_actor_options={"num_cpus": cfg.registry.num_cpus}
                                ).bind(backbone, shard, args, overrides, edge)
    return Ingress.options(num_replicas=cfg.ingress.num_replicas, max_ongoing_requests=cfg.ingress.max_ongoing_requests,
                           logging_config=logs, ray_actor_options={"num_cpus": cfg.ingress.num_cpus}).bind(registry, backbone, shard, edge)


def build(args: dict[str, Any]):
    """Application builder for ``serve deploy`` / ``serve run serve.app:build`` (args = the service config)."""
    return build_app(args)
