"""Serve scoring service on a local Ray: scores equal the single-process pipeline for S=1 and S=3,
bad input gets a 4xx JSON error and the service keeps serving, hot reload, auth, the web page."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from serve.shards import ShardedSearch, shard_bounds

CATEGORY = "bottle"
TINY = {"data.image_size": 128, "data.crop_size": 112, "bank.coreset_ratio": 0.05, "bank.threshold_images": 8,
        "bank.batch_size": 8}
MAX_BYTES = 2_000_000
MAX_PIXELS = 4_000_000


# ---------------------------------------------------------------- ShardedSearch without Ray
class _Done:
    def __init__(self, v):
        self.v = v

    def result(self):
        return self.v


class _LocalShard:
    def __init__(self, bank):
        from tocoad_ray.bank.knn import KNNIndex

        self.index = KNNIndex(bank)

    def search(self, q, k):
        return _Done(self.index.search(q, k))

    def vectors(self, idx):
        return _Done(self.index.bank[idx])


@pytest.mark.parametrize("n_shards", [1, 2, 3, 5])
def test_sharded_search_equals_one_bank(n_shards):
    from tocoad_ray.bank.memory_bank import MemoryBank

    rng = np.random.default_rng(0)
    bank = rng.normal(size=(503, 16)).astype(np.float32)
    patches = rng.normal(size=(4 * 49, 16)).astype(np.float32)
    mb = MemoryBank(bank)
    b = shard_bounds(len(bank), n_shards)
    ss = ShardedSearch([_LocalShard(bank[b[i]:b[i + 1]]) for i in range(n_shards)], b[:-1], 16)
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
    return {"base": base, "root": root, "a": a, "b": b}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_config(path: Path, tiny, **extra) -> None:
    args = {
        "products": [{"name": "b1", "artifact": str(tiny["a"]), "shards": 1},
                     {"name": "b3", "artifact": str(tiny["a"]), "shards": 3},
                     {"name": "fixed", "artifact": str(tiny["a"]), "shards": 2, "threshold": 1.5}],
        "artifacts_dir": str(tiny["base"] / "live"),
        "poll_interval_s": 0.5, "snapshot_ttl_s": 0.2,
        "max_upload_bytes": MAX_BYTES, "max_pixels": MAX_PIXELS,
        "backbone": {"num_cpus": 0.25, "min_replicas": 1, "max_replicas": 1, "max_batch_size": 4},
        "shards": {"num_cpus": 0.1, "min_replicas": 2, "max_replicas": 2},
        "ingress": {"num_cpus": 0.1}, "registry": {"num_cpus": 0.1},
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

    (tiny["base"] / "live").mkdir(exist_ok=True)
    cfg = tiny["base"] / "service.yaml"
    _write_config(cfg, tiny)
    port = _free_port()
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 * 1024 * 1024, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({}, {"watch_file": str(cfg)}), name="tocoad", route_prefix="/")
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        _wait(lambda: {p["product"] for p in client.get("/v1/products").json()["products"]} >= {"b1", "b3", "fixed"})
        yield {"client": client, "url": f"http://127.0.0.1:{port}", "config": cfg}
        client.close()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


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
    prods = {p["product"]: p for p in c.get("/v1/products").json()["products"]}
    assert [s["size"] for s in prods["b3"]["shards"]] and len(prods["b3"]["shards"]) == 3
    assert sum(s["size"] for s in prods["b3"]["shards"]) == prods["b1"]["bank_size"]
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
        assert set(r.json()) == {"error", "detail"}, url
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


# ---------------------------------------------------------------- hot reload
def _copy_artifact(src: Path, dst: Path) -> None:
    """Copy payload files first and meta.json last, as the artifact writer does."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name != "meta.json":
            shutil.copy2(f, dst / (f.name + ".tmp"))
            os.replace(dst / (f.name + ".tmp"), dst / f.name)
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
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def test_web_page_in_headless_chromium(service, reference, tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("chromium / chromedriver not installed (apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install selenium)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={tmp_path / 'chrome-profile'}"]:
        opts.add_argument(a)
    drv = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=opts)
    try:
        drv.set_page_load_timeout(60)
        drv.get(service["url"] + "/")
        wait = WebDriverWait(drv, 60)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#product option")) >= 3)
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
    finally:
        drv.quit()
