"""Operator feedback on real bottle images: a flagged normal image joins the bank as a new artifact
version and then scores below the threshold, the other images do not score higher, AUROC holds,
rollback restores the old scores exactly; the size cap, the refusal of anomalous images, a crash
mid-update, concurrent updates, old artifacts; and the same through the Serve application (with
the drift gauges)."""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from ._subset import mvtec_subset
from .ray_fixtures import release_shared_ray

# eager F (no TorchScript freeze): these tests load many versions, each once
CFG = {"method": "patchcore", "data.image_size": 128, "data.crop_size": 112, "bank.coreset_ratio": 0.1,
       "bank.threshold_images": 20, "bank.batch_size": 8, "backbone.fast_inference": False}


def fitted_artifact(base: Path, data_root: Path) -> tuple[Path, Path]:
    """(data root, artifact): 20 real training bottles, 12 good + 8 defective test images, a
    patchcore fit; made once per test session (other modules copy it before changing it)."""
    root, art = base / "feedback-data", base / "feedback-fit"
    if not (art / "meta.json").is_file():
        from tocoad_ray.config import load_config
        from tocoad_ray.pipeline import fit

        if not root.exists():
            mvtec_subset(data_root / "mvtec_ad" / "bottle", root, 20, {"good": 12, "broken_large": 4, "contamination": 4})
        fit(load_config(None, CFG), root, "bottle", art, progress=False, log=lambda *_: None)
    return root, art


def darkened(path: str | Path, factor: float = 0.6) -> bytes:
    """A defect-free image under dimmer light: PNG bytes."""
    img = ImageEnhance.Brightness(Image.open(path).convert("RGB")).enhance(factor)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def scores_of(artifact, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, float]:
    """Image scores (eq. 9), each image's largest patch distance s' (eq. 8) and the threshold."""
    import torch

    from tocoad_ray.pipeline import load_detector

    det = load_detector(artifact)
    x = torch.stack([det.preprocess.image(im) for im in images])
    rows, _ = det.model.embed(x)
    s, s_prime = det.bank.score(rows, len(images), det.cfg.bank.num_neighbors)
    return s, s_prime.reshape(len(images), -1).max(1), det.threshold


def _rgb(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, data_root):
    from tocoad_ray.data import load_split, read_image

    root, art = fitted_artifact(tmp_path_factory.getbasetemp(), Path(data_root))
    test = load_split(root, "bottle", "mvtec").test
    images = [read_image(s.path) for s in test]
    labels = np.array([s.label for s in test])
    good = [s.path for s in test if s.label == 0]
    dark = [darkened(p) for p in good[:5]]  # defect-free, under dimmer light
    s, smax, thr = scores_of(art, images + [_rgb(d) for d in dark])
    n = len(images)
    return {"root": root, "art": art, "test": test, "images": images, "labels": labels, "scores": s[:n],
            "smax": smax[:n], "threshold": thr, "good": good, "dark": dark, "dark_scores": s[n:]}


def _copy(fitted, tmp_path: Path) -> Path:
    dst = tmp_path / "art"
    shutil.copytree(fitted["art"], dst)
    return dst


def _bank_cli(argv: list[str]) -> int:
    from tocoad_ray.commands import bank

    ap = argparse.ArgumentParser(prog="tocoad")
    bank.add_parser(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(["bank", *argv])
    return args.func(args)


# ---------------------------------------------------------------- library
def test_feedback_fixes_a_flagged_normal_image_and_rollback_restores_it(fitted, tmp_path, capsys):
    from tocoad_ray.artifact_versions import current_version, list_versions, rollback
    from tocoad_ray.bank.feedback import add_normal_images
    from tocoad_ray.metrics import evaluate_scores
    from tocoad_ray.pipeline import load_detector

    art = _copy(fitted, tmp_path)
    root_meta = (art / "meta.json").read_bytes()
    dark, thr = fitted["dark"][0], fitted["threshold"]
    assert np.all(fitted["dark_scores"] >= thr)  # dimmer light: flagged, though nothing is wrong with the bottles

    res = add_normal_images(art, [("dark.png", dark)])
    assert res["written"] and res["version"] == 2 and res["previous_version"] == 1 and not res["reselected"]
    assert res["rows_added"] > 0 and res["bank_size"] == res["previous_bank_size"] + res["rows_added"]
    assert res["added"][0]["score_before"] == pytest.approx(fitted["dark_scores"][0], rel=1e-6)
    s2, smax2, thr2 = scores_of(art, fitted["images"] + [_rgb(dark)])
    after, s2, smax2 = s2[-1:], s2[:-1], smax2[:-1]
    assert after[0] < thr2 and after[0] < thr
    assert after[0] == pytest.approx(res["added"][0]["score_after"], rel=1e-6)

    # the other images: no patch distance grows (the new bank contains the old one); eq. 9's
    # reweighting over c*'s neighbours may shift an image score by a hair either way
    assert np.all(smax2 <= fitted["smax"] + 1e-4)
    assert np.all(s2 <= fitted["scores"] * (1 + 1e-3)), (s2 - fitted["scores"]).max()
    auroc = lambda s: evaluate_scores(fitted["labels"], s)["image_auroc"]  # noqa: E731
    assert auroc(s2) >= auroc(fitted["scores"]) - 0.005

    # the threshold: the fit's quantile over the stored leave-one-out scores plus the added image's
    meta1 = json.loads(root_meta)
    meta2 = load_detector(art).meta
    pool = meta1["normal_scores"] + [res["added"][0]["held_out_score"]]
    assert thr2 == pytest.approx(float(np.quantile(pool, meta1["config"]["bank"]["threshold_quantile"])))
    assert meta2["normal_scores"] == pytest.approx(pool)
    rec = meta2["feedback_images"]
    assert [(r["name"], r["sha256"], r["version"]) for r in rec] == [("dark.png", hashlib.sha256(dark).hexdigest(), 2)]
    assert (art / "meta.json").read_bytes() == root_meta  # version 1 never changes
    assert [(v["version"], v["current"]) for v in list_versions(art)] == [(1, False), (2, True)]

    # the same image again: nothing to add, no version written
    again = add_normal_images(art, [("same.png", dark)])
    assert not again["written"] and again["skipped"][0]["reason"] == "already in the bank"
    assert current_version(art) == 2

    rollback(art, 1)
    s1, _, t1 = scores_of(art, fitted["images"])
    np.testing.assert_array_equal(s1, fitted["scores"])
    assert t1 == fitted["threshold"]
    # the CLI: versions and rollback (to v2 and back to 1)
    assert _bank_cli(["rollback", "--artifact", str(art), "--version", "v2"]) == 0
    assert current_version(art) == 2
    assert _bank_cli(["versions", "--artifact", str(art), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert [v["version"] for v in listed if v["current"]] == [2] and listed[1]["added"][0]["name"] == "dark.png"
    assert _bank_cli(["rollback", "--artifact", str(art), "--version", "1"]) == 0
    assert current_version(art) == 1 and load_detector(art).meta["bank_size"] == meta1["bank_size"]
    from tocoad_ray.errors import ArtifactError, ConfigError

    with pytest.raises(ArtifactError, match="no version 7"):
        _bank_cli(["rollback", "--artifact", str(art), "--version", "7"])
    with pytest.raises(ConfigError):
        _bank_cli(["rollback", "--artifact", str(art), "--version", "latest"])


def test_size_cap_reselects_a_coreset_of_the_union(fitted, tmp_path):
    from tocoad_ray.bank.feedback import add_normal_images
    from tocoad_ray.pipeline import load_detector

    art = _copy(fitted, tmp_path)
    m = int(json.loads((art / "meta.json").read_text())["bank_size"])
    dark = fitted["dark"][1]
    res = add_normal_images(art, [("dark.png", dark)], max_size=m + 10)
    assert res["reselected"] and res["rows_added"] > 10 and res["bank_size"] == m + 10
    det = load_detector(art)
    assert len(det.bank) == m + 10 and det.cfg.bank.max_size == m + 10
    assert det.meta["feedback"]["reselected"] is True
    # greedy k-center keeps the far-away rows first: the new kind of image is still covered
    after, _, thr = scores_of(art, [_rgb(dark)])
    assert after[0] < thr


def test_force_is_required_for_an_obviously_anomalous_image(fitted, tmp_path):
    from tocoad_ray.artifact_versions import existing_versions
    from tocoad_ray.bank.feedback import FeedbackRefused, add_normal_images
    from tocoad_ray.errors import DataError

    art = _copy(fitted, tmp_path)
    worst = int(np.argmax(np.where(fitted["labels"] == 1, fitted["scores"], -np.inf)))
    path = Path(fitted["test"][worst].path)
    assert fitted["scores"][worst] > 1.5 * fitted["threshold"]  # a broken bottle
    with pytest.raises(FeedbackRefused, match="force") as e:
        add_normal_images(art, [path])
    assert isinstance(e.value, DataError) and e.value.refused[0]["name"] == path.name
    assert existing_versions(art) == [1] and not (art / "current.json").exists()
    res = add_normal_images(art, [path], force=True)
    assert res["version"] == 2 and res["added"][0]["forced"] is True


def test_crash_mid_update_leaves_the_old_version_serving(fitted, tmp_path):
    """The writer is killed (SIGKILL, no clean-up) after the new bank file is written and before
    the version's meta.json: the old version loads and scores exactly as before, and the next
    update succeeds."""
    from tocoad_ray.artifact_versions import current_dir, existing_versions
    from tocoad_ray.bank.feedback import add_normal_images

    art = _copy(fitted, tmp_path)
    img = tmp_path / "dark.png"
    img.write_bytes(fitted["dark"][2])
    script = (
        "import os, signal, sys\n"
        "import tocoad_ray.bank.feedback as fb\n"
        "def crash(folder, meta):\n"
        "    assert (folder / 'bank.safetensors').is_file()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "fb.write_meta = crash\n"
        "fb.add_normal_images(sys.argv[1], [sys.argv[2]])\n"
    )
    p = subprocess.run([sys.executable, "-c", script, str(art), str(img)], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    partial = list((art / "versions").glob(".tmp-*"))
    assert len(partial) == 1 and (partial[0] / "bank.safetensors").is_file() and not (partial[0] / "meta.json").exists()
    assert current_dir(art) == art and existing_versions(art) == [1]
    s, _, thr = scores_of(art, fitted["images"])
    np.testing.assert_array_equal(s, fitted["scores"])
    assert thr == fitted["threshold"]
    res = add_normal_images(art, [img])  # the lock died with the writer; its leftovers are cleared
    assert res["version"] == 2 and not list((art / "versions").glob(".tmp-*"))


def test_concurrent_updates_keep_each_others_images_and_old_artifacts_still_work(fitted, tmp_path):
    """Two updates at once queue on the artifact's lock: the second builds on the first. An
    artifact written before versions and stored normal scores (meta without ``normal_scores``)
    takes feedback too, its threshold from the stored quantiles."""
    from tocoad_ray.artifact import read_meta, write_meta
    from tocoad_ray.bank.feedback import add_normal_images
    from tocoad_ray.pipeline import load_detector

    art = _copy(fitted, tmp_path)
    meta = read_meta(art)
    del meta["normal_scores"]
    write_meta(art, meta)
    assert load_detector(art).threshold == fitted["threshold"]
    images = [(f"dark{i}.png", fitted["dark"][3 + i]) for i in range(2)]
    out, errors = [], []

    def add(item):
        try:
            out.append(add_normal_images(art, [item]))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=add, args=(im,)) for im in images]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert sorted(r["version"] for r in out) == [2, 3]
    final = load_detector(art).meta
    assert sorted(a["name"] for a in final["feedback_images"]) == ["dark0.png", "dark1.png"]
    assert final["score_stats"]["n"] == meta["score_stats"]["n"] + 2
    assert np.all(scores_of(art, [_rgb(d) for _, d in images])[0] < final["threshold"])


# ---------------------------------------------------------------- the service
@pytest.fixture(scope="module")
def service(fitted, tmp_path_factory):
    """The Serve application on a local Ray (reused when another module's instance is up) with one
    product on a copy of the fitted artifact, a scoring token and a small drift window."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import httpx
    import ray
    import yaml
    from ray import serve

    from serve.app import build_app

    from .test_serve import _free_port

    base = tmp_path_factory.mktemp("feedback-serve")
    art = base / "fb"
    shutil.copytree(fitted["art"], art)
    cfg = base / "service.yaml"
    cfg.write_text(yaml.safe_dump({
        "products": [{"name": "fb", "artifact": str(art), "shards": 1}],
        "poll_interval_s": 0.5, "snapshot_ttl_s": 0.2, "auth_token": "tok",
        "drift": {"window": 10, "min_images": 10, "alpha": 0.01, "trend_every": 5},
        "backbone": {"num_cpus": 0.25, "min_replicas": 1, "max_replicas": 1, "max_batch_size": 4},
        "shards": {"num_cpus": 0.1, "min_replicas": 1, "max_replicas": 1},
        "ingress": {"num_cpus": 0.1}, "registry": {"num_cpus": 0.1}, "edge": {"num_cpus": 0.1}}))
    release_shared_ray()
    owner = not ray.is_initialized()
    if owner:
        ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 * 1024 * 1024, log_to_driver=False,
                 _system_config={"metrics_report_interval_ms": 1000})
        serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    app, prefix = ("tocoad", "/") if owner else ("feedback-test", "/feedback-test")
    try:
        serve.run(build_app({}, {"watch_file": str(cfg)}), name=app, route_prefix=prefix)
        from ray.serve.context import _get_global_client

        url = _get_global_client().root_url.rstrip("/") + prefix.rstrip("/")
        client = httpx.Client(base_url=url, timeout=300, headers={"Authorization": "Bearer tok"})
        _wait(lambda: "fb" in {p["product"] for p in client.get("/v1/products").json()["products"]}, 120)
        yield {"client": client, "url": url, "art": art}
        client.close()
    finally:
        if owner:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
        else:
            serve.delete(app)


def _wait(cond, timeout=60.0):
    from .test_serve import _wait as wait

    wait(cond, timeout=timeout)


def _metrics_text() -> str:
    import httpx
    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text


def _png_bytes(path) -> bytes:
    return Path(path).read_bytes()


def test_service_drift_feedback_and_rollback(service, fitted):
    import httpx

    c = service["client"]
    good = [_png_bytes(p) for p in fitted["good"][:10]]
    dark = [darkened(p) for p in fitted["good"][:10]]

    def product():
        return {p["product"]: p for p in c.get("/v1/products").json()["products"]}["fb"]

    # drift: a window of normal images, no alarm; then the same images under dimmer light, alarm
    r = c.post("/v1/products/fb/score-batch", files=[("files", (f"g{i}.png", b)) for i, b in enumerate(good)])
    assert r.status_code == 200, r.text
    np.testing.assert_allclose([x["score"] for x in r.json()["results"]], fitted["scores"][fitted["labels"] == 0][:10],
                               rtol=1e-5)
    d = product()["drift"]
    assert d["images"] == 10 and d["alarm"] is False and d["ks"] < d["ks_critical"], d
    r = c.post("/v1/products/fb/score-batch", files=[("files", (f"d{i}.png", b)) for i, b in enumerate(dark)])
    dark_scores = [x["score"] for x in r.json()["results"]]
    d = product()["drift"]
    assert d["alarm"] is True and "shift" in d["reasons"] and d["ks"] == pytest.approx(1.0), d
    assert d["share_above"] == 1.0 and len(d["trend"]) == 4 and d["trend"][-1][3] == 1.0
    _wait(lambda: 'tocoad_drift_alarm{' in _metrics_text() and
          any(line.startswith("ray_tocoad_drift_alarm") and 'product="fb"' in line and line.rstrip().endswith(" 1.0")
              for line in _metrics_text().splitlines()), 180)
    assert "ray_tocoad_drift_ks{" in _metrics_text() and "ray_tocoad_drift_share_above{" in _metrics_text()

    # feedback needs the token
    r = httpx.post(service["url"] + "/v1/products/fb/feedback", content=dark[0])
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert c.post("/v1/products/fb/feedback?verdict=anomalous", content=dark[0]).json()["error"] == "invalid_parameter"
    v1 = product()["model_version"]

    # two feedbacks at once, scoring goes on meanwhile
    answers, scored_during, versions_scored = {}, [], []

    def send(i):
        answers[i] = c.post("/v1/products/fb/feedback?verdict=normal",
                            files={"file": (f"dark{i}.png", dark[i])})

    threads = [threading.Thread(target=send, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        r = c.post("/v1/products/fb/score", content=good[0])
        assert r.status_code == 200, r.text
        versions_scored.append(r.json()["model_version"])
        if any(t.is_alive() for t in threads):
            scored_during.append(r.json()["model_version"])
    for t in threads:
        t.join()
    assert scored_during, "no image was scored while the feedback was being written"
    for i in (0, 1):
        assert answers[i].status_code == 200, answers[i].text
        assert answers[i].json()["published"] is True
    assert sorted(answers[i].json()["version"] for i in (0, 1)) == [2, 3]
    latest = max((answers[i].json() for i in (0, 1)), key=lambda a: a["version"])
    listing = c.get("/v1/products/fb/versions").json()["versions"]
    assert [v["version"] for v in listing if v["current"]] == [3]
    assert sorted(a["name"] for v in listing for a in v["added"]) == ["dark0.png", "dark1.png"]
    p = product()
    assert p["model_version"] == latest["model_version"] != v1 and p["artifact_version"] == 3
    # a new version starts a new window: it holds only the scores made on that version
    assert (p["drift"] or {"images": 0})["images"] == versions_scored.count(latest["model_version"])
    for i in (0, 1):
        body = c.post("/v1/products/fb/score", content=dark[i]).json()
        assert body["model_version"] == latest["model_version"] and body["score"] < body["threshold"]
        assert body["score"] < dark_scores[i]

    # an obviously anomalous image needs force
    worst = int(np.argmax(np.where(fitted["labels"] == 1, fitted["scores"], -np.inf)))
    r = c.post("/v1/products/fb/feedback", content=_png_bytes(fitted["test"][worst].path))
    assert r.status_code == 409 and r.json()["error"] == "feedback_refused" and "force" in r.json()["detail"]

    # rollback: the fitted version serves again, with its scores
    r = c.post("/v1/products/fb/rollback?version=1")
    assert r.status_code == 200 and r.json()["published"] is True and r.json()["model_version"] == v1, r.text
    body = c.post("/v1/products/fb/score", content=dark[0]).json()
    assert body["model_version"] == v1 and body["score"] == pytest.approx(dark_scores[0], rel=1e-6)
    r = c.post("/v1/products/fb/rollback?version=9")
    assert r.status_code == 404 and r.json()["error"] == "unknown_version"


def test_page_marks_a_flagged_image_normal(service, fitted, tmp_path):
    """In headless Chromium: a flagged (darkened) bottle gets a 'mark as normal' button; after the
    click it is scored again by the new version, as normal; the drift line shows for the product."""
    from .browser import headless_chrome

    img = tmp_path / "dark-bottle.png"
    img.write_bytes(fitted["dark"][2])
    drv = headless_chrome(tmp_path / "chrome-profile", 1280, 1400)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        drv.get(service["url"] + "/")
        wait = WebDriverWait(drv, 180)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#product option"))
        wait.until(lambda d: d.find_element(By.ID, "token").is_displayed())
        drv.find_element(By.ID, "token").send_keys("tok")
        drv.find_element(By.ID, "file").send_keys(str(img))
        drv.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_element(By.ID, "verdict").text == "ANOMALOUS")
        button = drv.find_element(By.CSS_SELECTOR, "#results td button.fb")
        assert button.text == "mark as normal" and drv.find_element(By.ID, "markNormal").is_displayed()
        button.click()
        wait.until(lambda d: "added: version" in d.find_element(By.ID, "status").text)
        wait.until(lambda d: d.find_element(By.ID, "verdict").text == "normal")
        assert not drv.find_elements(By.CSS_SELECTOR, "#results td button.fb")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#drift .drift-product[data-product=fb] canvas"))
    finally:
        drv.quit()
    listing = service["client"].get("/v1/products/fb/versions").json()["versions"]
    assert [v["added"][0]["name"] for v in listing if v["current"]] == ["dark-bottle.png"]
