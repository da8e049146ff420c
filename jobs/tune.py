"""``tocoad tune``: a Ray Tune search per category, scored without the test set.

Each trial runs the same per-category driver as ``tocoad train-all``
(``tocoad_ray.distributed.category.train_category``, Train inside Tune) in validation mode: a
seeded share of the training images is held out, G_val's anomalies are made from them, and the
score on that set is the objective (``tocoad_ray.validation``). Every training epoch reports the
quick-bank score (Ray Train → ``TuneReportCallback``), the finished bank the full one; ASHA stops
the weak trials. Categories are a grid dimension; the space is sampled within each.

After the search, per category: the best configuration (by validation only) and the default one
are evaluated once on the test split, side by side; finished trials are evaluated on test too, for
the validation-vs-test plot and rank correlation (analysis only, never for selection).

Output folder (run again to resume an interrupted search)::

    search.yaml               the plan (base config + search section): a re-run must match it
    search/                   Ray Tune's experiment (restored on re-run)
    runs/<config digest>/     train_category output of each distinct configuration
    best/<category>.yaml      the chosen configuration; tocoad fit / train-all --config take it
    report.md, report.json, val_vs_test.png

    tocoad tune --data data/mvtec_ad --categories bottle --plan configs/tune_small.yaml
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tocoad_ray.config import Config, ConfigError, from_dict
from tocoad_ray.digest import digest
from tocoad_ray.distributed.storage import is_uri, join, resolve
from tocoad_ray.names import DEFAULT_METHOD

if TYPE_CHECKING:  # the search space imports torch; --help must not
    from tocoad_ray.search_space import SearchPlan

EXPERIMENT = "search"


def config_digest(cfg: Config) -> str:
    return digest(cfg.to_dict(), 12)


def run_dir(out: Path, cfg: Config) -> Path:
    """One folder per distinct configuration: a trial and the default run with equal configs share it."""
    return out / "runs" / config_digest(cfg)


def storage_root(cfg: Config, out: str | Path) -> str:
    """Ray's storage for the search: ``distributed.storage_path`` (a shared folder or a URI), else OUT."""
    return resolve(cfg.distributed.storage_path) if cfg.distributed.storage_path else str(out)


def run_storage(cfg: Config, out: str | Path) -> str:
    """Ray Train storage of one configuration's run (its checkpoints), beside its Tune experiment."""
    return join(storage_root(cfg, out), "runs", config_digest(cfg), "ray")


def trial_needs(cfg: Config, gpu: bool) -> dict[str, float]:
    """What one trial occupies at once: its driver, and for ToCoAD the DDP workers and their data tasks."""
    d = cfg.distributed
    cpu = d.driver_cpus + (d.num_workers * (d.cpus_per_worker + d.data_tasks * d.data_cpus) if cfg.method == "tocoad"
                           else d.feature_actors)
    need = {"CPU": cpu, "memory": d.category_memory_gb * 2**30}
    if gpu and cfg.method == "tocoad":
        need["GPU"] = d.num_workers * d.gpus_per_worker
    return need


def max_concurrent(cfg: Config, resources: dict[str, float], requested: int) -> int:
    """``search.max_concurrent_trials``, or (0) how many trials the resources hold at once."""
    if requested:
        return requested
    need = trial_needs(cfg, resources.get("GPU", 0) > 0)
    fits = [resources.get(k, 0) / v for k, v in need.items() if v > 0]
    return max(1, int(math.floor(min(fits))))


def physical_resources() -> dict[str, float]:
    """This machine, for a local instance (whose logical CPUs are raised so the data tasks never starve)."""
    import psutil

    res = {"CPU": float(os.cpu_count() or 1), "memory": float(psutil.virtual_memory().total) * 0.8}
    try:
        import torch

        if torch.cuda.is_available():
            res["GPU"] = float(torch.cuda.device_count())
    except ImportError:  # pragma: no cover
        pass
    return res


def trial(params: dict[str, Any], base: dict, data_root: str, out: str, validation: dict, val_generator: str) -> None:
    """A Tune trial: train_category in validation mode, then the full-bank score as the last report."""
    import ray.tune
    from filelock import FileLock
    from ray.tune.integration.ray_train import TuneReportCallback

    from tocoad_ray.distributed.category import train_category
    from tocoad_ray.search_space import apply
    from tocoad_ray.validation import ValidationConfig

    category = params["category"]
    cfg = apply(from_dict(Config, base), {k: v for k, v in params.items() if k != "category"})
    folder = run_dir(Path(out), cfg)
    folder.mkdir(parents=True, exist_ok=True)
    # two trials can sample the same configuration: the second waits and reuses the first's run
    # (each configuration has its own Ray Train storage, so different trials never share a run)
    with FileLock(str(folder / f".{category}.lock")):
        res = train_category(cfg, data_root, category, folder, run_storage(cfg, out),
                             validation=ValidationConfig(**validation), val_generator=val_generator,
                             callbacks=[TuneReportCallback()] if cfg.method == "tocoad" else None)
    ray.tune.report({**{k: v for k, v in res["metrics"].items() if k.startswith("val_")},
                     "val_bank": "full", "final": True, "run": str(folder)})


def _tune_space(plan: SearchPlan, categories: list[str]) -> dict[str, Any]:
    from ray import tune

    make = {"choice": tune.choice, "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(*v)}
    space: dict[str, Any] = {"category": tune.grid_search(categories)}
    for key, dist in plan.space.items():
        (kind, values), = dist.items()
        space[key] = make[kind](values)
    return space


def check_categories(plan: SearchPlan, data_root: str, categories: list[str]) -> None:
    """Every category has enough training images to hold some out (before any trial starts)."""
    from tocoad_ray.data import DataError, load_split
    from tocoad_ray.validation import holdout

    if not categories:
        raise ConfigError("no categories to search")
    if len(set(categories)) != len(categories):
        raise ConfigError(f"categories listed twice: {categories}")
    for cat in categories:
        split = load_split(data_root, cat, plan.base.data.layout)
        if not split.train:
            raise DataError(f"no training images for {cat!r} under {data_root}")
        holdout(len(split.train), plan.search.validation, plan.base.seed)


def _search(plan: SearchPlan, data_root: str, categories: list[str], out: Path, concurrent: int, echo,
            callbacks: list | None = None) -> Any:
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from tocoad_ray.distributed.asha import PerCategoryASHA
    from tocoad_ray.search_space import max_reports

    s = plan.search
    trainable = tune.with_resources(
        tune.with_parameters(trial, base=plan.base.to_dict(), data_root=str(data_root), out=str(out),
                             validation=json.loads(json.dumps(_dc(s.validation))), val_generator=plan.val_generator),
        {"CPU": plan.base.distributed.driver_cpus, "memory": plan.base.distributed.category_memory_gb * 2**30,
         **plan.base.distributed.driver_resources})
    storage = storage_root(plan.base, out)
    exp = join(storage, EXPERIMENT)
    if tune.Tuner.can_restore(exp):
        echo(f"tune: resuming the search in {exp}")
        tuner = tune.Tuner.restore(exp, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        scheduler = (PerCategoryASHA(time_attr="training_iteration", max_t=max_reports(plan.base, plan.space),
                                     grace_period=s.asha.grace_period, reduction_factor=s.asha.reduction_factor)
                     if s.asha.enabled else FIFOScheduler())
        tuner = tune.Tuner(
            trainable, param_space=_tune_space(plan, categories),
            tune_config=tune.TuneConfig(metric=s.metric, mode="max", num_samples=s.num_samples, scheduler=scheduler,
                                        # the generator itself limits concurrency (Tune ignores
                                        # max_concurrent_trials next to a SearchGenerator)
                                        search_alg=BasicVariantGenerator(random_state=s.seed, max_concurrent=concurrent)),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=storage,
                                      failure_config=tune.FailureConfig(max_failures=s.max_failures), verbose=1,
                                      callbacks=callbacks))
    return tuner.fit()


def _dc(obj: Any) -> Any:
    from dataclasses import asdict

    return asdict(obj)


def _trial_rows(grid, plan: SearchPlan, out: Path) -> list[dict[str, Any]]:
    """One row per trial: its sampled values, status, reports and final validation scores."""
    from tocoad_ray.search_space import apply
    rows = []
    for r in grid:
        cfg_params = {k: v for k, v in (r.config or {}).items() if k != "category"}
        metrics = r.metrics or {}
        try:
            df = r.metrics_dataframe
            n_reports = 0
            if df is not None and len(df):
                # a trial that finished just before the search was killed replays its final report
                # on resume (its run is reused, not retrained): count that report once
                finals = df["final"].fillna(False).astype(bool) if "final" in df else None
                n_reports = int(len(df)) if finals is None else int((~finals).sum()) + int(finals.any())
        except Exception:  # noqa: BLE001
            n_reports = 0
        final = bool(metrics.get("final"))
        status = "finished" if final else ("error" if r.error else "stopped early (ASHA)")
        row = {"trial": "_".join(Path(r.path).name.split("_")[:3]) if r.path else "?", "category": (r.config or {}).get("category"),
               "params": cfg_params, "status": status, "reports": n_reports,
               "error": str(r.error).strip().splitlines()[-1][:300] if r.error else None,
               "last_reported": {k: metrics.get(k) for k in ("val_score", "val_image_auroc", "val_pixel_auroc",
                                                            "val_aupro", "val_bank") if k in metrics}}
        if final:
            row["validation"] = {k: metrics[k] for k in ("val_score", "val_image_auroc", "val_pixel_auroc", "val_aupro")}
            row["run"] = metrics.get("run") or str(run_dir(out, apply(plan.base, cfg_params)))
        rows.append(row)
    return rows


def _test_once(run: str, data_root: str, category: str) -> dict[str, Any]:
    """Test metrics of a finished run's artifact, cached next to its result (computed once)."""
    from tocoad_ray.artifact import atomic_write_bytes
    from tocoad_ray.pipeline import evaluate

    work = Path(run) / "work" / category
    cache = work / "test.json"
    result = json.loads((work / "result.json").read_text())
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("fingerprint") == result["fingerprint"]:
            return saved["metrics"]
    m = evaluate(result["artifact"], data_root, category, progress=False)
    m.pop("_arrays", None)
    parts = [m[k] for k in ("image_auroc", "pixel_auroc", "aupro") if m.get(k) is not None]
    m["test_score"] = float(sum(parts) / len(parts))
    atomic_write_bytes(cache, json.dumps({"fingerprint": result["fingerprint"], "metrics": m}, indent=2).encode())
    return m


def _finish(plan: SearchPlan, data_root: str, categories: list[str], out: Path, rows: list[dict[str, Any]], echo
            ) -> dict[str, dict[str, Any]]:
    """Per category: best by validation, the default configuration's run, and the test evaluations."""
    import ray

    from tocoad_ray.distributed.category import train_category_safe
    from tocoad_ray.search_space import apply
    from tocoad_ray.validation import ValidationConfig

    d = plan.base.distributed
    train = ray.remote(num_cpus=d.driver_cpus, memory=int(d.category_memory_gb * 2**30) or None,
                       resources=d.driver_resources or None, max_retries=d.max_failures)(train_category_safe)
    test = ray.remote(num_cpus=1)(_test_once)
    vcfg = ValidationConfig(**_dc(plan.search.validation))
    default_dir = run_dir(out, plan.base)
    default_refs = {cat: train.remote(plan.base, data_root, cat, str(default_dir), run_storage(plan.base, out),
                                      validation=vcfg, val_generator=plan.val_generator) for cat in categories}
    summary: dict[str, dict[str, Any]] = {}
    metric = plan.search.metric
    for cat in categories:
        entry: dict[str, Any] = {"best": None, "default": None}
        default = ray.get(default_refs[cat])
        mine = [r for r in rows if r["category"] == cat and r.get("validation")]
        if default["status"] == "ok":
            row = {"trial": "default", "category": cat, "params": {}, "status": "default (after the search)",
                   "reports": 1, "error": None, "last_reported": {},
                   "validation": {k: v for k, v in default["metrics"].items() if k.startswith("val_")},
                   "run": str(default_dir)}
            rows.append(row)
            mine.insert(0, row)  # first: a tie keeps the default
            entry["default"] = row
        else:
            entry["default_error"] = default["error"]
        # selection by validation only; the default competes, so a search never picks worse than it
        best = max(mine, key=lambda r: r["validation"][metric], default=None)
        entry["best"] = best
        # the test split, once per run: best and default for the result, the other finished
        # trials only for the validation-vs-test analysis
        todo = {r["run"]: r for r in mine if plan.search.evaluate_trials_on_test or r is best or r["trial"] == "default"}
        got = dict(zip(todo, ray.get([test.remote(run, data_root, cat) for run in todo])))
        for r in mine:
            if r["run"] in got:
                r["test"] = got[r["run"]]
        if best is not None:
            entry["best_yaml"] = str(write_best_yaml(out, cat, apply(plan.base, best["params"]), best))
            echo(f"  {cat}: best {metric} {best['validation'][metric]:.3f} ({best['trial']})"
                 + (f", default {entry['default']['validation'][metric]:.3f}" if entry["default"] else ""))
        summary[cat] = entry
    return summary


def write_best_yaml(out: Path, category: str, cfg: Config, row: dict[str, Any]) -> Path:
    from tocoad_ray.artifact import atomic_write_bytes

    path = out / "best" / f"{category}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    head = (f"# tocoad tune: best configuration for {category} by validation {json.dumps(row['validation'])}\n"
            f"# trial {row['trial']}; searched values: {json.dumps(row['params'])}\n")
    atomic_write_bytes(path, (head + cfg.to_yaml()).encode())
    return path


def run(plan: SearchPlan, data_root: str, categories: list[str], out: str | Path, address: str | None = None,
        verbose: bool = False, echo=print, select: bool = True) -> dict[str, Any]:
    """The whole search: trials, then (``select``) selection, the default run, test evaluation of
    best and default, report. ``select=False`` stops after the trials and returns their rows: the
    part that must never read the test set."""
    import ray

    from jobs.train_all import local_cpus
    from tocoad_ray.artifact import atomic_write_bytes
    from tocoad_ray.tune_report import write_tune_report

    check_categories(plan, data_root, categories)
    if is_uri(out):
        raise ConfigError(f"--out {out}: the output folder must be a filesystem path every node mounts; "
                          f"put Ray's storage on a URI with distributed.storage_path")
    out = Path(resolve(out))
    data_root = data_root if data_root in ("-", "", None) else resolve(data_root)  # trials run in other folders
    from dataclasses import replace as dc_replace

    from jobs.train_all import resolve_inputs

    plan = dc_replace(plan, base=resolve_inputs(plan.base))
    tracking, tracked = None, plan.base
    if plan.base.tracking.enabled:  # mlflow missing: a one-line error before Ray starts
        from tocoad_ray.config import TrackingConfig, replace
        from tocoad_ray.distributed.tracking import TuneTracking

        tracking = TuneTracking.plan(plan.base, out)
        # the Tune driver logs, not the trials: their configs and run folders leave tracking out
        plan = dc_replace(plan, base=replace(plan.base, tracking=TrackingConfig()))
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "search.yaml"
    import yaml

    plan_dict = {**plan.to_dict(), "data_root": str(data_root), "categories": categories}
    if saved.is_file():
        if yaml.safe_load(saved.read_text()) != json.loads(json.dumps(plan_dict)):
            raise ConfigError(f"{out} holds a search with another plan ({saved}); use another --out to start a new one")
    else:
        atomic_write_bytes(saved, yaml.safe_dump(json.loads(json.dumps(plan_dict)), sort_keys=False).encode())

    from tocoad_ray.distributed.session import connect

    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized() or address:
        where = connect(address, verbose=verbose)
        resources = dict(ray.cluster_resources())
    else:
        resources = physical_resources()
        n = max_concurrent(plan.base, resources, plan.search.max_concurrent_trials)
        # with the dashboard: Ray Train's placement-group cleaner asks the state API whether a stage's
        # controller is still alive, and frees the workers' CPUs when ASHA stops a trial mid-stage
        # (without it those CPUs stay reserved and the next trial's data tasks starve)
        connect(None, local_cpus(plan.base, n), dashboard=True, verbose=verbose)
        where = "local"
    from jobs.train_all import node_inputs
    from tocoad_ray.distributed.storage import check_cluster

    check_cluster({"output folder (--out)": str(out), "distributed.storage_path": storage_root(plan.base, out)},
                  readable=node_inputs(plan.base, data_root))
    concurrent = max_concurrent(plan.base, resources, plan.search.max_concurrent_trials)
    n_trials = plan.search.num_samples * len(categories)
    echo(f"tune: {n_trials} trials ({plan.search.num_samples} per category: {', '.join(categories)}), method "
         f"{plan.base.method}, {concurrent} at once on Ray ({where}); objective {plan.search.metric} on held-out "
         f"images + {plan.val_generator} anomalies; output {out}")
    t0 = time.perf_counter()
    callbacks = None
    if tracking:
        line, trial_runs = tracking.start(tracked)
        echo(f"tune: {line}")
        callbacks = [trial_runs]
    grid = _search(plan, data_root, categories, out, concurrent, echo, callbacks)
    search_s = time.perf_counter() - t0
    rows = _trial_rows(grid, plan, out)
    if not select:
        return {"trials": rows, "search_s": search_s}
    echo(f"tune: search done in {search_s:.0f}s; selecting and evaluating best and default on test")
    summary = _finish(plan, data_root, categories, out, rows, echo)
    report = write_tune_report(out, plan, categories, rows, summary, {
        "search_s": search_s, "total_s": time.perf_counter() - t0, "address": where, "max_concurrent_trials": concurrent,
        "resources": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}})
    if tracking:
        from tocoad_ray.search_space import apply

        tracking.finish(grid, rows, plan.base, apply, out)
    return report


def add_parser(sub) -> argparse.ArgumentParser:
    from tocoad_ray.commands import args as A

    p = A.add_command(sub, "tune", "Ray Tune search per category, scored on held-out images (never the test set)")
    A.add_data(p)
    p.add_argument("--categories", default="all", help="comma-separated categories, or all")
    p.add_argument("--out", default="runs/tune", metavar="DIR", help="output folder (run again to resume)")
    p.add_argument("--plan", metavar="YAML",
                   help="search plan: a config plus a 'search' section (default: the method's built-in space)")
    p.add_argument("--plan-set", action="append", metavar="KEY=VALUE",
                   help="override a search setting, e.g. num_samples=8 or validation.fraction=0.25; repeatable")
    p.add_argument("--samples", type=int, help="trials per category (shortcut for --plan-set num_samples=N)")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local instance)")
    p.add_argument("--track", action="store_true", help="log to MLflow (tracking.enabled; docs/tracking.md)")
    A.add_config(p, config=False)  # the plan file is the base config
    A.add_verbosity(p)
    p.set_defaults(func=cmd_tune)
    return p


def plan_from_args(args: argparse.Namespace) -> SearchPlan:
    from tocoad_ray.commands import args as A
    from tocoad_ray.search_space import load_plan

    ov = A.config_overrides(args)
    ov.pop("method", None)
    if getattr(args, "track", False):
        ov["tracking.enabled"] = True
    sov = A.overrides(args.plan_set, "--plan-set")
    if args.samples is not None:
        sov["num_samples"] = args.samples
    method = args.method or (None if args.plan and A.file_sets_method(args.plan) else DEFAULT_METHOD)
    return load_plan(args.plan, ov, sov, method=method)


def cmd_tune(args: argparse.Namespace) -> int:
    from tocoad_ray.commands import args as A
    from tocoad_ray.data import list_categories
    from tocoad_ray.tune_report import markdown_report

    plan = plan_from_args(args)
    root = A.data_root(args)
    available = list_categories(root, plan.base.data.layout)
    cats = A.categories(args.categories, available) or available
    report = run(plan, root or "-", cats, args.out, address=args.address, verbose=args.verbose)
    print()
    print(markdown_report(report))
    print(f"report: {Path(args.out) / 'report.md'}; best configurations: {Path(args.out) / 'best'}")
    return 0 if all(report["categories"][c].get("best") for c in cats) else 1


def main(argv: list[str] | None = None) -> int:
    from tocoad_ray.cli import main as cli_main

    return cli_main(["tune", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
