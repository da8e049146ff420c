"""Load test of the Serve scoring service on this machine (127.0.0.1 only, bounded).

Starts a local Ray + the service for one artifact (S bank shards), then for each concurrency level
sends a fixed number of requests (asyncio + httpx) under a time cap and reports throughput,
p50/p95/p99 latency and errors; repeats one level while killing a BankShard replica (ray.kill)
mid-run, reporting errors and time to recovery; finally measures the ceiling, the raw batched
backbone forward (PatchModel.embed) in this process. One JSON line per measurement.

    python bench/serve_load.py --artifact /tmp/serve_art/bottle --shards 3
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _pct(lat: list[float], q: float) -> float | None:
    return round(float(np.percentile(lat, q)) * 1000, 1) if lat else None


async def load_level(url: str, product: str, bodies: list[bytes], n: int, concurrency: int, cap_s: float,
                     on_progress=None) -> dict:
    """``n`` POSTs with ``concurrency`` in flight, stopped at ``cap_s`` seconds."""
    import httpx

    lat, errors, codes, t_ok = [], 0, {}, []
    nxt = 0
    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        async def worker():
            nonlocal nxt, errors
            while nxt < n and time.perf_counter() - t0 < cap_s:
                i = nxt
                nxt += 1
                t = time.perf_counter()
                try:
                    r = await c.post(f"/v1/products/{product}/score", content=bodies[i % len(bodies)])
                    code = r.status_code
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
            "_t_ok": t_ok}


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


def ceiling(artifact: str, bodies: list[bytes], batch: int, seconds: float) -> dict:
    """Images/s of the raw batched backbone forward (no HTTP, no Ray, no bank search)."""
    import torch

    from tocoad_ray.data.image_io import decode_image_bytes
    from tocoad_ray.pipeline import load_detector

    det = load_detector(artifact)
    xs = torch.stack([det.preprocess.image(decode_image_bytes(b)) for b in bodies[:batch]])
    while len(xs) < batch:
        xs = torch.cat([xs, xs])[:batch]
    det.model.embed(xs)  # warm-up at the measured batch size
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        det.model.embed(xs)
        n += batch
    wall = time.perf_counter() - t0
    return {"bench": "backbone_ceiling", "batch": batch, "images": n, "wall_s": round(wall, 2),
            "images_per_s": round(n / wall, 2), "torch_threads": torch.get_num_threads()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", default="/tmp/serve_art/bottle")
    ap.add_argument("--images", default=str(ROOT.parent / "shared/data/mvtec_ad/bottle/test"),
                    help="folder of images to send (searched recursively)")
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=64, help="requests per level")
    ap.add_argument("--time-cap", type=float, default=60.0, help="seconds per level at most")
    ap.add_argument("--kill-concurrency", type=int, default=4)
    ap.add_argument("--no-kill", action="store_true")
    ap.add_argument("--ceiling-batch", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--ceiling-seconds", type=float, default=15.0)
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs for the local Ray")
    ap.add_argument("--backbone-max-replicas", type=int, default=2)
    args = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from serve.app import build_app

    bodies = request_bodies(args.images)
    url, port = loopback_url()
    svc = {"products": [{"name": "p", "artifact": args.artifact, "shards": args.shards}], "poll_interval_s": 5.0,
           "backbone": {"num_cpus": 0.5, "min_replicas": 1, "max_replicas": args.backbone_max_replicas,
                        "target_ongoing_requests": 4, "max_batch_size": 8, "batch_wait_timeout_s": 0.01},
           "shards": {"num_cpus": 0.25, "min_replicas": 2, "max_replicas": 4, "target_ongoing_requests": 8},
           "ingress": {"num_cpus": 0.25}, "registry": {"num_cpus": 0.1}}
    settings = {"artifact": args.artifact, "shards": args.shards, "requests": args.requests,
                "time_cap_s": args.time_cap, "images": len(bodies), "host": platform.node(),
                "cpus": os.cpu_count(), "ray_num_cpus": args.num_cpus, "service": svc}
    print(json.dumps({"bench": "settings", **settings}), flush=True)

    # the ceiling before and after the service runs brackets other jobs' load on a shared machine
    for b in map(int, args.ceiling_batch.split(",")):
        print(json.dumps({**ceiling(args.artifact, bodies, b, args.ceiling_seconds), "when": "before"}), flush=True)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, object_store_memory=300 << 20, log_to_driver=False)
    try:
        import httpx

        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t = time.perf_counter()
        serve.run(build_app(svc), name="tocoad", route_prefix="/")
        for _ in range(240):
            if httpx.get(url + "/v1/products").json()["products"]:
                break
            time.sleep(0.5)
        print(json.dumps({"bench": "startup", "seconds": round(time.perf_counter() - t, 1)}), flush=True)
        asyncio.run(load_level(url, "p", bodies, 8, 4, 60))  # warm-up: lazy imports, first batches

        for c in [int(x) for x in args.concurrency.split(",")]:
            res = asyncio.run(load_level(url, "p", bodies, args.requests, c, args.time_cap))
            res.pop("_t_ok")
            print(json.dumps({"bench": "serve_load", **res, "shards": args.shards}), flush=True)

        if not args.no_kill:
            n = args.requests
            killed: dict = {}

            def progress(sent):
                if sent >= n // 4 and not killed:
                    killed["t"] = time.perf_counter()
                    killed["t_rel"] = None
                    # kill from a thread so the event loop keeps sending
                    threading.Thread(target=lambda: killed.update(name=kill_one_shard()), daemon=True).start()

            t0 = time.perf_counter()
            res = asyncio.run(load_level(url, "p", bodies, n, args.kill_concurrency, args.time_cap, progress))
            t_ok = res.pop("_t_ok")
            t_kill = killed.get("t", t0) - t0
            after = [x for x in t_ok if x > t_kill]
            gaps = np.diff([t_kill] + after) if after else []
            before = 2  # svc shards.min_replicas
            t_rec = time.perf_counter()
            while len(shard_replicas()) < before and time.perf_counter() - t_rec < 60:
                time.sleep(0.25)
            snap = {"shard_replicas_after": len(shard_replicas()),
                    "replica_replaced_after_kill_s": round(time.perf_counter() - killed.get("t", t0), 1)}
            print(json.dumps({"bench": "serve_load_kill_shard", **res, "shards": args.shards,
                              "killed": killed.get("name"), "kill_at_s": round(t_kill, 2),
                              "ok_after_kill": len(after),
                              "longest_gap_after_kill_s": round(float(max(gaps)), 2) if len(gaps) else None,
                              **snap}), flush=True)
            # recovered? a second short level after the kill
            res = asyncio.run(load_level(url, "p", bodies, n // 2, args.kill_concurrency, args.time_cap))
            res.pop("_t_ok")
            print(json.dumps({"bench": "serve_load_after_recovery", **res, "shards": args.shards,
                              "shard_replicas": len(shard_replicas())}), flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    for b in map(int, args.ceiling_batch.split(",")):
        print(json.dumps({**ceiling(args.artifact, bodies, b, args.ceiling_seconds), "when": "after"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
