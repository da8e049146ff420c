"""Load test of the Serve scoring service on this machine (127.0.0.1 only, bounded).

For each bank search (exact, IVF: copies of one artifact that differ only in ``bank.search``):
the in-process ceiling first, the library scoring the same images (decode + preprocess +
``Detector.score`` at batch 16, one process, all cores); then a local Ray + the service for that
artifact (S bank shards), single-image requests at each concurrency level and batch requests of
16 images, each level a fixed number of requests (asyncio + httpx) under a time cap: throughput,
share of the ceiling, p50/p95/p99 latency, errors; the resident memory of every Serve process by
deployment; optionally (``--kill``) one level while a BankShard replica is killed (errors, time to
recovery). One JSON line per measurement.

This VM's speed drifts (the ceiling moved by a quarter within one run, and by a third between
8 s windows minutes apart), so every single-image level alternates ``--rounds`` rounds of the
ceiling (``--ceiling-each`` seconds, the service idle) and of the load (a share of the requests);
``of_ceiling`` divides the service's images/s over its rounds by the library's over the
interleaved rounds (``of_start_ceiling`` by the figure measured before the service started). The
batch levels keep one adjacent ceiling window each.

    python bench/serve_load.py --artifact runs/bench_scoring/mvtec_ad_bottle
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import threading
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _pct(lat: list[float], q: float) -> float | None:
    return round(float(np.percentile(lat, q)) * 1000, 1) if lat else None


class _Client:
    """POSTs over keep-alive connections with ``aiohttp`` (default: it spends about a third of the
    CPU per request that ``httpx`` does, and on a small machine the load generator's CPU is taken
    from the service it measures) or ``httpx``."""

    def __init__(self, kind: str, url: str, concurrency: int, timeout: float):
        self.kind, self.url, self.concurrency, self.timeout = kind, url, concurrency, timeout

    async def __aenter__(self):
        if self.kind == "aiohttp":
            import aiohttp

            self._c = aiohttp.ClientSession(base_url=self.url, connector=aiohttp.TCPConnector(limit=self.concurrency),
                                            timeout=aiohttp.ClientTimeout(total=self.timeout))
        else:
            import httpx

            limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
            self._c = httpx.AsyncClient(base_url=self.url, timeout=self.timeout, limits=limits)
        await self._c.__aenter__()
        return self

    async def __aexit__(self, *exc):
        await self._c.__aexit__(*exc)

    async def post(self, path: str, body: bytes) -> int:
        """The response's status code (the body is read)."""
        if self.kind == "aiohttp":
            async with self._c.post(path, data=body, headers={"content-type": "application/octet-stream"}) as r:
                await r.read()
                return r.status
        r = await self._c.post(path, content=body)
        return r.status_code


CLIENT = "aiohttp"  # --client


async def load_level(url: str, product: str, bodies: list[bytes], n: int, concurrency: int, cap_s: float,
                     on_progress=None) -> dict:
    """``n`` POSTs with ``concurrency`` in flight, stopped at ``cap_s`` seconds."""
    lat, errors, codes, t_ok = [], 0, {}, []
    nxt = 0
    t0 = time.perf_counter()
    async with _Client(CLIENT, url, concurrency, 60) as c:
        async def worker():
            nonlocal nxt, errors
            while nxt < n and time.perf_counter() - t0 < cap_s:
                i = nxt
                nxt += 1
                t = time.perf_counter()
                try:
                    code = await c.post(f"/v1/products/{product}/score", bodies[i % len(bodies)])
                except Exception as e:  # connection errors count as errors too
                    code = type(e).__name__
                dt = time.perf_counter() - t
                codes[str(code)] = codes.get(str(code), 0) + 1
                if code == 200:
                    lat.append(dt)
                    t_ok.append(time.perf_counter() - t0)
                else:
                    errors += 1
                if on_progress:
                    on_progress(nxt)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "sent": nxt, "ok": len(lat), "errors": errors, "status_counts": codes,
            "wall_s": round(wall, 2), "throughput_rps": round(len(lat) / wall, 2),
            "p50_ms": _pct(lat, 50), "p95_ms": _pct(lat, 95), "p99_ms": _pct(lat, 99), "capped": wall >= cap_s,
            "_t_ok": t_ok, "_lat": lat}


def merge_levels(parts: list[dict]) -> dict:
    """One level measured in several rounds → its totals (throughput over the rounds' summed wall time)."""
    lat = [x for p in parts for x in p["_lat"]]
    codes: dict[str, int] = {}
    for p in parts:
        for k, v in p["status_counts"].items():
            codes[k] = codes.get(k, 0) + v
    wall = sum(p["wall_s"] for p in parts)
    return {"concurrency": parts[0]["concurrency"], "rounds": len(parts), "sent": sum(p["sent"] for p in parts),
            "ok": len(lat), "errors": sum(p["errors"] for p in parts), "status_counts": codes,
            "wall_s": round(wall, 2), "throughput_rps": round(len(lat) / wall, 2) if wall else 0.0,
            "p50_ms": _pct(lat, 50), "p95_ms": _pct(lat, 95), "p99_ms": _pct(lat, 99),
            "capped": any(p["capped"] for p in parts)}


async def batch_level(url: str, product: str, bodies: list[bytes], n: int, per_request: int, concurrency: int,
                      cap_s: float) -> dict:
    """``n`` batch requests of ``per_request`` images each (multipart ``files``), ``concurrency`` in flight."""
    import httpx

    lat, errors, images, nxt = [], 0, 0, 0
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        async def worker():
            nonlocal nxt, errors, images
            while nxt < n and time.perf_counter() - t0 < cap_s:
                i = nxt
                nxt += 1
                files = [("files", (f"{i}_{j}.png", bodies[(i * per_request + j) % len(bodies)], "image/png"))
                         for j in range(per_request)]
                t = time.perf_counter()
                try:
                    r = await c.post(f"/v1/products/{product}/score-batch", files=files)
                    ok = r.status_code == 200 and r.json()["n_failed"] == 0
                except Exception:
                    ok = False
                if ok:
                    lat.append(time.perf_counter() - t)
                    images += per_request
                else:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"route": "score-batch", "images_per_request": per_request, "concurrency": concurrency, "sent": nxt,
            "ok": len(lat), "errors": errors, "wall_s": round(wall, 2), "images_per_s": round(images / wall, 2),
            "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99)}


def request_bodies(folder: str, n: int = 32) -> list[bytes]:
    """The bytes of the first ``n`` images under ``folder`` (searched recursively), to send as requests."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not paths:
        raise SystemExit(f"no images under {folder}")
    return [p.read_bytes() for p in paths[:n]]


def loopback_url() -> tuple[str, int]:
    """A free port on 127.0.0.1 and its URL: the benches never listen beyond this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}", port


def shard_replicas() -> list[str]:
    import ray

    # named actors come from the GCS: no dashboard / state API needed (tests run without it)
    acts = ray.util.list_named_actors(all_namespaces=True)
    return [a["name"] for a in acts if a["namespace"] == "serve" and "BankShard" in a["name"]
            and a["name"].startswith("SERVE_REPLICA")]


def kill_one_shard() -> str:
    import ray

    names = shard_replicas()
    if not names:
        raise RuntimeError("no BankShard replica found")
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    return names[0]


def cpu_by_process() -> dict[str, float]:
    """CPU seconds so far of every Serve process by deployment (as ``serve_rss`` names them), of
    this process (the load generator) and of everything else on the machine (Ray's own daemons)."""
    import psutil
    from serve_autoscale import serve_process

    out: dict[str, float] = {}
    me = os.getpid()
    total = sum(getattr(psutil.cpu_times(), f) for f in ("user", "system", "nice"))
    known = 0.0
    for p in psutil.process_iter(["cmdline", "cpu_times", "pid"]):
        try:
            key = "(load generator)" if p.info["pid"] == me else serve_process(" ".join(p.info["cmdline"] or []))
            t = p.info["cpu_times"].user + p.info["cpu_times"].system
        except (psutil.Error, TypeError, AttributeError):
            continue
        if key is None:
            continue
        out[key] = out.get(key, 0.0) + t
        known += t
    out["(rest of the machine)"] = total - known
    return out


def cpu_ms_per_image(before: dict[str, float], after: dict[str, float], images: int) -> dict[str, float]:
    return {k: round(1000 * (after.get(k, 0.0) - v) / max(images, 1), 1) for k, v in before.items()}


def ceiling(artifact: str, bodies: list[bytes], batch: int, seconds: float) -> dict:
    """Images/s of the library in this process: decode + preprocess + ``Detector.score`` (F, the
    bank search, eq. 9, the maps) over batches of ``batch`` images (no HTTP, no Ray)."""
    import torch

    from tocoad_ray.data.image_io import decode_image_bytes
    from tocoad_ray.pipeline import load_detector

    det = load_detector(artifact)

    def one_batch(i: int) -> None:
        chunk = [bodies[(i + j) % len(bodies)] for j in range(batch)]
        det.score(torch.stack([det.preprocess.image(decode_image_bytes(b)) for b in chunk]))

    one_batch(0)  # warm-up at the measured batch size
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        one_batch(n)
        n += batch
    wall = time.perf_counter() - t0
    return {"bench": "library_ceiling", "search": det.cfg.bank.search, "batch": batch, "images": n,
            "wall_s": round(wall, 2), "images_per_s": round(n / wall, 2), "torch_threads": torch.get_num_threads(),
            "cpu_ms_per_image": round(1000 * (time.process_time() - c0) / max(n, 1), 1)}


def with_search(artifact: str, search: str, tmp: Path) -> str:
    """A copy of ``artifact`` whose config asks for ``search`` (meta.json is not among its own
    checksummed files, so the copy verifies)."""
    dst = tmp / f"{Path(artifact).name}-{search}"
    shutil.copytree(artifact, dst)
    meta = json.loads((dst / "meta.json").read_text())
    meta["config"]["bank"]["search"] = search
    (dst / "meta.json").write_text(json.dumps(meta, indent=1))
    return str(dst)


def service_settings(pairs: list[str]) -> dict:
    """["backbone.batch_wait_timeout_s=0", ...] → {"backbone.batch_wait_timeout_s": 0, ...} (YAML values)."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set takes KEY=VALUE, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", default=str(ROOT / "runs/bench_scoring/mvtec_ad_bottle"))
    ap.add_argument("--images", default=str(ROOT.parent / "shared/data/mvtec_ad/bottle/test"),
                    help="folder of images to send (searched recursively)")
    ap.add_argument("--searches", default="exact,ivf", help="comma-separated bank searches to serve in turn")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--local-bank-max-mb", type=float, default=None,
                    help="the service's local_bank_max_mb (default: its own); 0 sends every search to BankShards")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=128, help="single-image requests per level")
    ap.add_argument("--batch-requests", type=int, default=12, help="batch requests (16 images each) per level")
    ap.add_argument("--time-cap", type=float, default=60.0, help="seconds per level at most")
    ap.add_argument("--kill", action="store_true", help="also a level while a BankShard replica is killed")
    ap.add_argument("--kill-concurrency", type=int, default=4)
    ap.add_argument("--ceiling-batch", type=int, default=16)
    ap.add_argument("--ceiling-seconds", type=float, default=20.0)
    ap.add_argument("--ceiling-each", type=float, default=5.0,
                    help="seconds of ceiling per round of a level (0: only before and after)")
    ap.add_argument("--ceiling-sweep", default="4",
                    help="other batch sizes the library is also measured at before the service ('' for none)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="each single-image level alternates this many (ceiling, load) rounds")
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs for the local Ray")
    ap.add_argument("--backbone-max-replicas", type=int, default=1)
    ap.add_argument("--client", choices=["aiohttp", "httpx"], default="aiohttp", help="the load generator's HTTP client")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a service setting (serve/config.yaml's keys, dotted; YAML value), e.g. "
                         "backbone.batch_wait_timeout_s=0; repeatable")
    args = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    global CLIENT
    CLIENT = args.client
    import ray
    from ray import serve

    from serve.app import build_app
    from serve.cli import proxy_logging, serve_environment
    from serve_autoscale import serve_rss

    serve_environment()  # as `tocoad serve` starts its local Ray

    bodies = request_bodies(args.images)
    tmp = Path(tempfile.mkdtemp(prefix="serve_load_"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(json.dumps({"bench": "settings", "commit": commit, "artifact": args.artifact, "shards": args.shards,
                      "requests": args.requests, "time_cap_s": args.time_cap, "images": len(bodies),
                      "host": platform.node(), "cpus": os.cpu_count(), "ray_num_cpus": args.num_cpus,
                      "service_settings": service_settings(args.set), "client": args.client,
                      "serve_env": {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")}}), flush=True)
    try:
        for search in args.searches.split(","):
            art = with_search(args.artifact, search, tmp)
            ceil = ceiling(art, bodies, args.ceiling_batch, args.ceiling_seconds)
            print(json.dumps({**ceil, "when": "before"}), flush=True)
            for b in [int(x) for x in args.ceiling_sweep.split(",") if x and int(x) != args.ceiling_batch]:
                # the library at other batch sizes: which one this CPU likes (the service's max_batch_size)
                print(json.dumps({**ceiling(art, bodies, b, args.ceiling_each * 2), "when": "sweep"}), flush=True)
            serve_once(art, search, args, bodies, ceil["images_per_s"], ray, serve, build_app, proxy_logging,
                       serve_rss)
            print(json.dumps({**ceiling(art, bodies, args.ceiling_batch, args.ceiling_seconds), "when": "after"}),
                  flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def serve_once(art, search, args, bodies, ceil, ray, serve, build_app, proxy_logging, serve_rss) -> None:
    """The service for one artifact: single-image levels, batch levels, memory, optionally the kill."""
    url, port = loopback_url()
    svc = {"products": [{"name": "p", "artifact": art, "shards": args.shards}], "poll_interval_s": 5.0,
           # the service's defaults, but one replica each: on 2 cores a second one adds no compute
           "backbone": {"min_replicas": 1, "max_replicas": args.backbone_max_replicas},
           "shards": {"min_replicas": 1, "max_replicas": 1}}
    if args.local_bank_max_mb is not None:
        svc["local_bank_max_mb"] = args.local_bank_max_mb
    for key, value in service_settings(args.set).items():
        node = svc
        *parents, leaf = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, object_store_memory=300 << 20, log_to_driver=False)
    try:
        import httpx

        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=proxy_logging(SimpleNamespace(access_log=False)))
        t = time.perf_counter()
        serve.run(build_app(svc), name="tocoad", route_prefix="/")
        for _ in range(240):
            listed = httpx.get(url + "/v1/products").json()["products"]
            if listed:
                break
            time.sleep(0.5)
        print(json.dumps({"bench": "startup", "search": search, "seconds": round(time.perf_counter() - t, 1),
                          "search_in": listed[0].get("search_in") if listed else None}), flush=True)
        asyncio.run(load_level(url, "p", bodies, 16, 4, 60))  # warm-up: lazy imports, first batches

        def adjacent() -> float:  # the library's speed now, the service idle
            if args.ceiling_each <= 0:
                return ceil
            return ceiling(art, bodies, args.ceiling_batch, args.ceiling_each)["images_per_s"]

        for c in [int(x) for x in args.concurrency.split(",")]:
            # rounds of (the library's speed, the service's): both sample the same stretch of the
            # machine's drifting speed; each side's figure is its total over the rounds
            parts, cpu, ceil_img, ceil_s = [], {}, 0.0, 0.0
            for r in range(args.rounds):
                if args.ceiling_each > 0:
                    cr = ceiling(art, bodies, args.ceiling_batch, args.ceiling_each)
                    ceil_img, ceil_s = ceil_img + cr["images"], ceil_s + cr["wall_s"]
                cpu0 = cpu_by_process()
                part = asyncio.run(load_level(url, "p", bodies, args.requests // args.rounds, c, args.time_cap))
                for k, v in cpu_ms_per_image(cpu0, cpu_by_process(), 1).items():
                    cpu[k] = cpu.get(k, 0.0) + v
                parts.append(part)
            near = round(ceil_img / ceil_s, 2) if ceil_s else ceil
            res = merge_levels(parts)
            res["cpu_ms_per_image"] = {k: round(v / max(res["ok"], 1), 1) for k, v in cpu.items()}
            print(json.dumps({"bench": "serve_load", "route": "score", "search": search, **res,
                              "ceiling_images_per_s": near, "of_ceiling": round(res["throughput_rps"] / near, 3),
                              "of_start_ceiling": round(res["throughput_rps"] / ceil, 3),
                              "p99_over_p50": round(res["p99_ms"] / res["p50_ms"], 2) if res["p50_ms"] else None,
                              "shards": args.shards}), flush=True)
        for c in (1, 4):
            near = adjacent()
            cpu0 = cpu_by_process()
            res = asyncio.run(batch_level(url, "p", bodies, args.batch_requests, 16, c, args.time_cap))
            res["cpu_ms_per_image"] = cpu_ms_per_image(cpu0, cpu_by_process(), res["ok"] * 16)
            print(json.dumps({"bench": "serve_load", "search": search, **res, "ceiling_images_per_s": near,
                              "of_ceiling": round(res["images_per_s"] / near, 3),
                              "of_start_ceiling": round(res["images_per_s"] / ceil, 3), "shards": args.shards}),
                  flush=True)
        rss = serve_rss()
        print(json.dumps({"bench": "serve_rss", "search": search,
                          "total_mb": round(sum(v["rss_mb"] for v in rss.values()), 1), "by_deployment": rss}),
              flush=True)

        if args.kill:
            n = args.requests
            killed: dict = {}

            def progress(sent):
                if sent >= n // 4 and not killed:
                    killed["t"] = time.perf_counter()
                    # kill from a thread so the event loop keeps sending
                    threading.Thread(target=lambda: killed.update(name=kill_one_shard()), daemon=True).start()

            t0 = time.perf_counter()
            res = asyncio.run(load_level(url, "p", bodies, n, args.kill_concurrency, args.time_cap, progress))
            t_ok = res.pop("_t_ok")
            res.pop("_lat")
            t_kill = killed.get("t", t0) - t0
            after = [x for x in t_ok if x > t_kill]
            gaps = np.diff([t_kill] + after) if after else []
            t_rec = time.perf_counter()
            while len(shard_replicas()) < 1 and time.perf_counter() - t_rec < 60:
                time.sleep(0.25)
            print(json.dumps({"bench": "serve_load_kill_shard", "search": search, **res, "killed": killed.get("name"),
                              "kill_at_s": round(t_kill, 2), "ok_after_kill": len(after),
                              "longest_gap_after_kill_s": round(float(max(gaps)), 2) if len(gaps) else None,
                              "replica_replaced_after_kill_s": round(time.perf_counter() - killed.get("t", t0), 1)}),
                  flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
