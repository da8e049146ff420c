"""Autoscaling, memory and log volume of the Serve scoring service under a burst of load.

Starts a local Ray + the service for one artifact with the default autoscaling settings
(``serve/config.py``: ``Autoscaling``), then: idle → ``--load-s`` seconds of single-image requests at
``--concurrency`` → idle until every deployment is back at its minimum (or ``--settle-s``). Every
second it records each deployment's running replicas (``serve.status()``, no dashboard needed).
Prints JSON lines: the timeline, the seconds from the start of the load to the first added
replica and from the end of the load to the last removed one, the resident memory of every
Serve process by deployment at the peak, and the lines the service wrote to its logs during
the load (per scored image).

    python bench/serve_autoscale.py --artifact runs/bench_scoring/mvtec_ad_bottle/patchcore
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import load_level, loopback_url, request_bodies  # noqa: E402

DEPLOYMENTS = ("Backbone", "BankShard", "Ingress", "Registry")


def running_replicas(app: str = "tocoad") -> dict[str, int]:
    from ray import serve

    st = serve.status().applications.get(app)
    if st is None:
        return {}
    return {name: int(sum(n for s, n in d.replica_states.items() if str(getattr(s, "value", s)) == "RUNNING"))
            for name, d in st.deployments.items()}


def serve_process(cmd: str) -> str | None:
    """The deployment a process serves, from its title (``ray::ServeReplica:<app>:<deployment>``),
    "(controller)", "(proxy)" or "(haproxy)"; None for any other process."""
    if cmd.startswith("ray::ServeReplica:"):
        return cmd.split()[0].split(":")[-1].split(".")[0]  # the title may carry the running method
    if cmd.startswith("ray::ServeController"):
        return "(controller)"
    if cmd.startswith("ray::ProxyActor"):
        return "(proxy)"
    if os.path.basename(cmd.split(" ", 1)[0]) == "haproxy":  # Serve's HAProxy front (RAY_SERVE_ENABLE_HA_PROXY)
        return "(haproxy)"
    return None


def serve_rss() -> dict[str, dict[str, float]]:
    """Resident memory (MB) of every Serve process, by deployment (replica processes are titled
    ``ray::ServeReplica:<app>:<deployment>``), plus the controller and proxies."""
    import psutil

    out: dict[str, list[float]] = {}
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        try:
            key = serve_process(" ".join(p.info["cmdline"] or []))
            mem = p.info["memory_info"].rss / 2**20
        except (psutil.Error, TypeError, AttributeError):
            continue
        if key is not None:
            out.setdefault(key, []).append(round(mem, 1))
    return {k: {"processes": len(v), "rss_mb": round(sum(v), 1), "each_mb": v} for k, v in sorted(out.items())}


def log_lines(session_logs: Path) -> int:
    """Lines in the session's Serve and worker log files (what a console or log collector gets)."""
    n = 0
    for p in [*session_logs.glob("serve/*.log"), *session_logs.glob("worker-*.out"), *session_logs.glob("worker-*.err")]:
        try:
            with p.open("rb") as f:
                n += sum(1 for _ in f)
        except OSError:
            continue
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--images", default=str(ROOT.parent / "shared/data/mvtec_ad/bottle/test"),
                    help="folder of images to send (searched recursively)")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--load-s", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--settle-s", type=float, default=180.0, help="seconds to wait for the scale-down at most")
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs for the local Ray")
    ap.add_argument("--max-replicas", type=int, default=2, help="max_replicas of the backbone and shard deployments")
    args = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import httpx
    import ray
    from ray import serve

    from serve.app import build_app
    from serve.cli import proxy_logging, serve_environment
    from serve.config import from_dict

    serve_environment()  # as `tocoad serve` starts its local Ray

    bodies = request_bodies(args.images)
    url, port = loopback_url()
    # the defaults of serve/config.py, bar the product and the replica ceiling
    svc = {"products": [{"name": "p", "artifact": args.artifact, "shards": args.shards}],
           "backbone": {"max_replicas": args.max_replicas}, "shards": {"max_replicas": args.max_replicas}}
    cfg = from_dict(svc)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(json.dumps({"bench": "settings", "commit": commit, "host": platform.node(), "cpus": os.cpu_count(),
                      "ray_num_cpus": args.num_cpus, "concurrency": args.concurrency, "load_s": args.load_s,
                      "backbone": {k: v for k, v in cfg.to_dict()["backbone"].items()},
                      "shards": cfg.to_dict()["shards"]}), flush=True)

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, object_store_memory=300 << 20, log_to_driver=False)
    timeline: list[dict] = []
    stop = threading.Event()
    t_origin = time.perf_counter()

    def sample():
        while not stop.is_set():
            try:
                timeline.append({"t": round(time.perf_counter() - t_origin, 1), **running_replicas()})
            except Exception as e:  # noqa: BLE001 - a sample lost to a controller hiccup
                timeline.append({"t": round(time.perf_counter() - t_origin, 1), "error": type(e).__name__})
            stop.wait(1.0)

    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=proxy_logging(cfg))  # as tocoad serve
        serve.run(build_app(svc), name="tocoad", route_prefix="/")
        for _ in range(240):
            if httpx.get(url + "/readyz").status_code == 200:
                break
            time.sleep(0.5)
        asyncio.run(load_level(url, "p", bodies, 8, 2, 60))  # warm-up: lazy imports, first batches
        logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
        mins = {"Backbone": cfg.backbone.min_replicas, "BankShard": cfg.shards.min_replicas}
        threading.Thread(target=sample, daemon=True).start()
        time.sleep(5)  # an idle stretch before the load
        lines_before = log_lines(logs)
        t_load = time.perf_counter() - t_origin
        peak_rss: dict = {}

        def rss_at_peak():  # memory once the load has had time to add replicas
            time.sleep(min(args.load_s * 0.8, 45))
            peak_rss.update(serve_rss())

        threading.Thread(target=rss_at_peak, daemon=True).start()
        res = asyncio.run(load_level(url, "p", bodies, 10**9, args.concurrency, args.load_s))
        res.pop("_t_ok")
        t_end = time.perf_counter() - t_origin
        lines_during = log_lines(logs) - lines_before
        print(json.dumps({"bench": "serve_autoscale_load", **res}), flush=True)
        deadline = time.perf_counter() + args.settle_s
        while time.perf_counter() < deadline:
            now = running_replicas()
            if all(now.get(k, 0) <= v for k, v in mins.items()) and timeline[-1]["t"] > t_end:
                break
            time.sleep(1.0)
        time.sleep(2)
        stop.set()

        def first_up(name: str) -> float | None:
            for s in timeline:
                if s["t"] >= t_load and s.get(name, 0) > mins[name]:
                    return round(s["t"] - t_load, 1)
            return None

        def back_down(name: str) -> float | None:
            above = [s["t"] for s in timeline if s.get(name, 0) > mins[name]]
            if not above:
                return None
            last = max(above)
            after = [s["t"] for s in timeline if s["t"] > last]
            return round(after[0] - t_end, 1) if after else None

        print(json.dumps({"bench": "serve_autoscale", "load_from_s": round(t_load, 1), "load_until_s": round(t_end, 1),
                          **{f"{n}_up_after_s": first_up(n) for n in mins},
                          **{f"{n}_down_after_load_s": back_down(n) for n in mins},
                          **{f"{n}_peak_replicas": max((s.get(n, 0) for s in timeline), default=0) for n in mins},
                          "scored": res["ok"], "log_lines_during_load": lines_during,
                          "log_lines_per_1000_images": round(1000 * lines_during / max(1, res["ok"]), 1)}), flush=True)
        print(json.dumps({"bench": "serve_rss_at_peak", "total_mb": round(sum(v["rss_mb"] for v in peak_rss.values()), 1),
                          "by_deployment": peak_rss}), flush=True)
        print(json.dumps({"bench": "serve_autoscale_timeline", "timeline": timeline}), flush=True)
    finally:
        stop.set()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
