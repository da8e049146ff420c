"""``tocoad train-all``: every category of a data root trained, banked and evaluated on Ray.

One small driver task per category (``tocoad_ray.distributed.category.train_category``) runs
stage I and stage II as TorchTrainers, the bank through a Ray Data actor pool, then the
evaluation and the frozen-F PatchCore baseline. Categories run concurrently within the cluster's
resources; progress (stage, epoch, loss, ETA) is printed while they run; a failing category is
reported with its error and the others finish; running the same command again with the same
output folder skips finished categories and resumes interrupted ones from their checkpoints.

    tocoad train-all                                  # the main job: elpv mono + poly, local Ray
    tocoad train-all --data data/mvtec_ad --categories all --out runs/mvtec
    python -m jobs.train_all --address auto ...       # on an existing cluster (or RAY_ADDRESS)
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from tocoad_ray.config import Config, ConfigError, load_config
from tocoad_ray.distributed.storage import is_uri, resolve

# The embedded default (no --config, elpv data): ToCoAD with both stages and 2 DDP workers per
# category at a CPU budget that ends within 12 minutes on a 2-core machine. The paper's schedule
# is configs/paper.yaml + --set stage1.epochs=100 --set stage2.epochs=100 on a GPU cluster.
MAIN_JOB = {
    "method": "tocoad",
    "data.layout": "elpv",
    "stage1.epochs": 2, "stage1.max_steps_per_epoch": 3,
    "stage2.epochs": 2, "stage2.max_steps_per_epoch": 2,
    "bank.coreset_ratio": 0.01,
    "distributed.num_workers": 2,
    "distributed.data_tasks": 1,  # 2 categories × 2 workers already fill 2 cores
}


def local_cpus(cfg: Config, concurrent: int) -> int:
    """Logical CPUs for a local Ray instance: every concurrent category's driver, DDP workers and
    Ray Data tasks must fit at once, or the data tasks starve and training hangs (Ray notes)."""
    d = cfg.distributed
    need = concurrent * (d.driver_cpus + d.num_workers * (d.cpus_per_worker + d.data_tasks * d.data_cpus)) + 1
    return max(os.cpu_count() or 1, math.ceil(need))


def connect(address: str | None, cfg: Config, concurrent: int, verbose: bool) -> str:
    """Join ``address`` / RAY_ADDRESS, or start a local Ray instance sized for the run."""
    from tocoad_ray.distributed.session import connect as join_or_start

    return join_or_start(address, local_cpus(cfg, concurrent), verbose=verbose)


def run(cfg: Config, data_root: str, categories: list[str], out: str | Path, address: str | None = None,
        verbose: bool = False, interval_s: float = 10.0, echo=print) -> dict[str, Any]:
    """Train every category (concurrently), write ``out/report.{md,json}`` and per-category loss
    plots, and return the report."""
    import ray

    from tocoad_ray.artifact import atomic_write_bytes
    from tocoad_ray.distributed.category import train_category_safe
    from tocoad_ray.distributed.progress import format_line, start_board
    from tocoad_ray.distributed.storage import check_cluster
    from tocoad_ray.run_report import write_run_report

    if not categories:
        raise ConfigError("no categories to train")
    if len(set(categories)) != len(categories):
        raise ConfigError(f"categories listed twice: {categories}")
    if is_uri(out):
        raise ConfigError(f"--out {out}: the output folder must be a filesystem path every node mounts (artifacts are "
                          f"written as files); put Ray's checkpoints on a URI with distributed.storage_path")
    out = Path(resolve(out))
    data_root = data_root if data_root in ("-", "", None) else resolve(data_root)  # tasks run in other folders
    cfg = resolve_inputs(cfg)
    if cfg.method == "tocoad":  # layers the config names, checked before anything trains
        from tocoad_ray.train.extractor import needed_layers

        try:
            needed_layers(cfg)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    tracking = None
    if cfg.tracking.enabled:  # mlflow missing: a one-line error before Ray starts
        from tocoad_ray.distributed.tracking import TrainAllTracking

        tracking = TrainAllTracking.plan(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    storage = cfg.distributed.storage_path or str(out / "ray")
    limit = cfg.distributed.max_concurrent_categories or len(categories)
    where = connect(address, cfg, min(limit, len(categories)), verbose)
    t_check = time.perf_counter()
    check_cluster({"output folder (--out)": str(out), "distributed.storage_path": storage,
                   **(tracking.folders() if tracking else {})}, readable=node_inputs(cfg, data_root))
    echo(f"train-all: output {out} and storage {storage} checked on every node "
         f"({time.perf_counter() - t_check:.1f}s)")
    atomic_write_bytes(out / "config.yaml", cfg.to_yaml().encode())
    t0 = time.perf_counter()
    board_name = f"tocoad-progress-{uuid.uuid4().hex[:8]}"
    board = start_board(board_name)
    mem = int(cfg.distributed.category_memory_gb * 2**30)
    # a category's driver is retried on another node when its node dies (system failures only:
    # a category's own errors come back as a "failed" result); it resumes from its checkpoints
    retries = cfg.distributed.max_failures
    task = ray.remote(num_cpus=cfg.distributed.driver_cpus, resources=cfg.distributed.driver_resources or None,
                      max_retries=retries)(train_category_safe)
    if mem:
        if mem > ray.cluster_resources().get("memory", 0):
            raise ConfigError(f"distributed.category_memory_gb={cfg.distributed.category_memory_gb} is more than the "
                              f"cluster's {ray.cluster_resources().get('memory', 0) / 2**30:.1f} GiB of memory")
        task = task.options(memory=mem)  # admission control: categories wait for memory, not OOM
    echo(f"train-all: {len(categories)} categories ({', '.join(categories)}) on Ray ({where}, "
         f"{ray.cluster_resources().get('CPU', 0):g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs), "
         f"method {cfg.method}, {cfg.distributed.num_workers} DDP workers per category; output {out}")
    if tracking:
        from tocoad_ray.distributed.category import category_fingerprint

        echo("train-all: " + tracking.start(cfg, {c: category_fingerprint(cfg, data_root, c) for c in categories}))
    queue, pending, results = list(categories), {}, {}
    shown: dict[str, str] = {}
    while queue or pending:
        while queue and len(pending) < limit:
            cat = queue.pop(0)
            pending[task.remote(cfg, data_root, cat, str(out), storage, board_name,
                                tracking=tracking.runs[cat] if tracking else None)] = cat
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=interval_s)
        for ref in ready:
            cat = pending.pop(ref)
            try:
                results[cat] = visible_result(ray.get(ref), out)
            except Exception as e:  # noqa: BLE001 - the driver died more often than it may be retried
                results[cat] = {"category": cat, "status": "failed",
                                "error": (f"{type(e).__name__}: {e}".strip().splitlines() or ["?"])[0]}
        try:
            snap = ray.get(board.snapshot.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - progress is best effort
            snap = {}
        for cat in categories:
            if cat in results:
                r = results[cat]
                line = (f"{cat}: FAILED {r['error']}" if r["status"] != "ok" else
                        f"{cat}: done" + (" (finished earlier, skipped)" if r.get("skipped") else "")
                        + f", image AUROC {r['metrics'].get('image_auroc', float('nan')):.3f}"
                        + (f", shipped {r['selection']['shipped']}" if r.get("selection") else ""))
            elif cat in snap:
                line = format_line(cat, snap[cat])
            else:
                continue
            if shown.get(cat) != line:
                shown[cat] = line
                echo(f"  [{time.perf_counter() - t0:6.0f}s] {line}")
    wall = time.perf_counter() - t0
    for cat in categories:  # every category gets a row, with a reason
        results.setdefault(cat, {"category": cat, "status": "failed", "error": "the run ended before it finished"})
    report = write_run_report(out, cfg, results, categories, wall, {
        "address": where, "resources": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}})
    if tracking:
        tracking.finish(report, out)
    return report


def resolve_inputs(cfg: Config) -> Config:
    """The config with its local input paths (G's textures, F's weights file, the storage) made
    absolute on the driver: tasks on other nodes run in other working folders."""
    from tocoad_ray.config import replace

    d, g, b = cfg.distributed, cfg.generator, cfg.backbone
    return replace(cfg, generator=replace(g, texture_dir=resolve(g.texture_dir) if g.texture_dir else None),
                   backbone=replace(b, weights=b.weights if b.weights in ("pretrained", "random") else resolve(b.weights)),
                   distributed=replace(d, storage_path=resolve(d.storage_path) if d.storage_path else None))


def node_inputs(cfg: Config, data_root: str | None) -> dict[str, str]:
    """Local files every node that trains must read: the data, G's textures, F's weights file."""
    need = {}
    if data_root not in (None, "", "-") and not is_uri(data_root):
        need["data root (--data)"] = str(data_root)
    if cfg.generator.texture_dir:
        need["generator.texture_dir"] = resolve(cfg.generator.texture_dir)
    if cfg.backbone.weights not in ("pretrained", "random"):
        need["backbone.weights"] = resolve(cfg.backbone.weights)
    return need


def visible_result(res: dict[str, Any], out: Path) -> dict[str, Any]:
    """A category reported done must have left its result where the driver reads it: a task on a
    node that wrote to a node-local folder would otherwise "succeed" with the output out of reach."""
    cat = res.get("category")
    if res.get("status") == "ok" and not (out / "work" / str(cat) / "result.json").is_file():
        return {"category": cat, "status": "failed",
                "error": f"StorageError: {cat} finished on another node but {out / 'work' / str(cat) / 'result.json'} "
                         f"is not visible here: --out must be shared by every node"}
    return res


def add_parser(sub) -> argparse.ArgumentParser:
    from tocoad_ray.commands import args as A

    p = A.add_command(sub, "train-all", "the main job: train + bank + evaluate every category on Ray",
                      "Train, bank and evaluate every category of --data on Ray (a local instance, or the cluster "
                      "at --address / RAY_ADDRESS). Without --data: the elpv solar cells packaged on PyPI at a "
                      "12-minute CPU budget. Run it again with the same --out to resume.")
    A.add_data(p)
    p.add_argument("--categories", default="all", help="comma-separated categories, or all (elpv: mono,poly)")
    p.add_argument("--out", default="runs/train-all", metavar="DIR", help="output folder (run again to resume)")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local instance)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between progress updates")
    p.add_argument("--track", action="store_true", help="log to MLflow (tracking.enabled; docs/tracking.md)")
    A.add_config(p)
    A.add_verbosity(p)
    p.set_defaults(func=cmd_train_all)
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    """--config (or, without one and without --data, the embedded main-job budget) + overrides."""
    from tocoad_ray.commands import args as A

    base = dict(MAIN_JOB) if args.config is None and A.packaged(args.data) else {}
    overrides = A.config_overrides(args, base)
    if getattr(args, "track", False):
        overrides["tracking.enabled"] = True
    return load_config(args.config, overrides)


def cmd_train_all(args: argparse.Namespace) -> int:
    from tocoad_ray.commands import args as A
    from tocoad_ray.data import list_categories
    from tocoad_ray.run_report import markdown_report

    cfg = config_from_args(args)
    root = A.data_root(args)
    available = list_categories(root, cfg.data.layout)  # checked before Ray starts
    cats = A.categories(args.categories, available) or available
    report = run(cfg, root or "-", cats, args.out, address=args.address, verbose=args.verbose, interval_s=args.interval)
    print()
    print(markdown_report(report))
    print(f"report: {Path(args.out) / 'report.md'}, {Path(args.out) / 'report.json'}")
    failed = [c for c, r in report["categories"].items() if r["status"] != "ok"]
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    from tocoad_ray.cli import main as cli_main

    return cli_main(["train-all", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
