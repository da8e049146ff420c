"""Run tracking in MLflow: where a job logs, and what a category's or trial's run holds.

One MLflow experiment per job output folder; in it one parent run per job (``train-all`` or
``tune``: the job's config, report and plots) and one child run per category (train-all) or trial
(tune), tagged ``tocoad.job``, ``tocoad.category`` and nested with ``mlflow.parentRunId``, so
``mlflow ui`` shows them side by side. A child run holds the config it ran with (params, dotted
keys as in ``--set``), per-epoch metrics of stage I and II (``stage1/loss``, ``stage2/val_score``,
step = epoch), the final metrics (``image_auroc``, ``baseline/image_auroc``, ``time/fit_s``, ...)
and its files (``result.json``, the loss plot). A category run is found again by its category and
fingerprint, so a resumed job logs into the run it started.

mlflow is an optional extra: nothing here imports it until tracking is asked for. No Ray here
(the Ray callbacks that feed these runs are in ``distributed/tracking_callbacks.py``).
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from .config import Config, TrackingConfig
from .errors import ConfigError

logger = logging.getLogger(__name__)

INSTALL = 'pip install "tocoad-ray[tracking]"'
# MLflow 3 keeps its file store in maintenance mode and refuses it without this opt-out; the file
# store is the one that needs no server and takes writers from several nodes on a shared folder
ALLOW_FILE_STORE = "MLFLOW_ALLOW_FILE_STORE"
TAG_JOB, TAG_ROLE, TAG_OUT = "tocoad.job", "tocoad.role", "tocoad.out"
TAG_CATEGORY, TAG_FINGERPRINT, TAG_TRIAL = "tocoad.category", "tocoad.fingerprint", "tocoad.trial_id"
TAG_PARENT = "mlflow.parentRunId"
FINAL_METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "threshold", "threshold_tpr", "threshold_fpr",
                 "ms_per_image", "n_test", "bank_size", "val_score", "val_image_auroc", "val_pixel_auroc", "val_aupro")


def require_mlflow() -> Any:
    """The mlflow module, or a one-line error saying how to install it."""
    try:
        import mlflow
    except ImportError as e:
        raise ConfigError(f"run tracking (--track, tracking.enabled) needs mlflow: {INSTALL}") from e
    return mlflow


def tracking_uri(tcfg: TrackingConfig, out: str | Path) -> str:
    """``tracking.uri``, or a file store in ``out/mlruns``; a plain folder becomes a file: URI."""
    uri = tcfg.uri or str(Path(out) / "mlruns")
    if urlparse(uri).scheme or uri.startswith("databricks"):
        return uri
    return Path(uri).expanduser().resolve().as_uri()


def store_folder(uri: str) -> str | None:
    """The local folder of a file store (every node that logs must see it), None for a server or database."""
    parsed = urlparse(uri)
    return unquote(parsed.path) if parsed.scheme == "file" else None


def client(uri: str) -> Any:
    """An ``MlflowClient`` on ``uri`` (file stores allowed in this process)."""
    require_mlflow()
    from mlflow.tracking import MlflowClient

    if store_folder(uri) is not None:
        os.environ.setdefault(ALLOW_FILE_STORE, "true")
    return MlflowClient(tracking_uri=uri)


def experiment_name(tcfg: TrackingConfig, job: str, out: str | Path) -> str:
    return tcfg.experiment or f"{job} {Path(out).resolve()}"


def ensure_experiment(c: Any, name: str) -> str:
    """The id of experiment ``name``, created if absent (and restored if deleted)."""
    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            return c.create_experiment(name)
        except Exception:  # noqa: BLE001 - another process created it meanwhile
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        c.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def config_params(cfg: Config | dict[str, Any]) -> dict[str, str]:
    """The config as MLflow params: dotted keys (``stage2.lr``), tracking settings left out."""
    d = cfg.to_dict() if isinstance(cfg, Config) else cfg
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = str(node)

    walk({k: v for k, v in d.items() if k != "tracking"}, "")
    return out


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of ``metrics`` (bools as 0/1); text, None and NaN are left out."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (bool, int, float)) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


@dataclass(frozen=True)
class RunRef:
    """A run to log into from any process (picklable: Ray tasks and callbacks take it)."""

    uri: str
    run_id: str

    def log_metrics(self, metrics: dict[str, Any], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, int(step)) for k, v in numeric(metrics).items()]
        c = client(self.uri)
        for i in range(0, len(batch), 1000):  # MLflow's batch limit
            c.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        c = client(self.uri)
        for i in range(0, len(items), 100):  # MLflow's batch limit for params
            c.log_batch(self.run_id, params=items[i:i + 100])

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if Path(path).is_file():
            client(self.uri).log_artifact(self.run_id, str(path), folder)

    def set_tag(self, key: str, value: str) -> None:
        client(self.uri).set_tag(self.run_id, key, value[:5000])

    def finish(self, status: str = "FINISHED") -> None:
        client(self.uri).set_terminated(self.run_id, status)


def find_run(c: Any, experiment_id: str, tags: dict[str, str]) -> str | None:
    """The newest run of the experiment carrying all ``tags``."""
    filt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = c.search_runs([experiment_id], filt, max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def open_run(c: Any, uri: str, experiment_id: str, name: str, tags: dict[str, str],
             params: dict[str, Any] | None = None, key: tuple[str, ...] = ()) -> RunRef:
    """The run with the same ``key`` tags (a resumed job's, marked running again), else a new one
    with ``params`` (MLflow params cannot change, so they are logged once)."""
    found = find_run(c, experiment_id, {k: tags[k] for k in key}) if key else None
    if found is not None:
        c.update_run(found, status="RUNNING")
        return RunRef(uri, found)
    run = c.create_run(experiment_id, run_name=name, tags=tags)
    ref = RunRef(uri, run.info.run_id)
    if params:
        ref.log_params(params)
    return ref


def final_metrics(result: dict[str, Any]) -> dict[str, float]:
    """A finished category's metrics for its run: the method's, the baseline's, the timings."""
    out = {k: v for k, v in (result.get("metrics") or {}).items() if k in FINAL_METRICS}
    out.update({f"baseline/{k}": v for k, v in (result.get("baseline") or {}).items() if k in FINAL_METRICS})
    out.update({f"time/{k}": v for k, v in (result.get("timings") or {}).items()})
    return numeric(out)


def epoch_metrics(report: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """(epoch, metrics prefixed by the stage) of one stage report (``stage1/loss`` at epoch 3)."""
    stage = str(report.get("stage", "stage"))
    skip = {"epoch", "stage", "resumed_from", "final"}
    metrics = {(k if "/" in k else f"{stage}/{k}"): v for k, v in report.items() if k not in skip}
    return int(report.get("epoch", 0)), numeric(metrics)


@dataclass
class JobTracker:
    """A job's experiment and parent run (made on the driver); hands out the child runs."""

    uri: str
    job: str
    experiment_id: str
    parent: RunRef

    @classmethod
    def start(cls, tcfg: TrackingConfig, job: str, out: str | Path, cfg: Config) -> "JobTracker":
        uri = tracking_uri(tcfg, out)
        c = client(uri)
        exp = ensure_experiment(c, experiment_name(tcfg, job, out))
        tags = {TAG_JOB: job, TAG_ROLE: "job", TAG_OUT: str(Path(out).resolve())}
        parent = open_run(c, uri, exp, job, tags, config_params(cfg), key=(TAG_ROLE, TAG_OUT))
        logger.info("tracking %s in MLflow %s (experiment %s, run %s)", job, uri, exp, parent.run_id)
        return cls(uri, job, exp, parent)

    def child(self, name: str, category: str, params: dict[str, Any], key_tags: dict[str, str] | None = None
              ) -> RunRef:
        tags = {TAG_JOB: self.job, TAG_ROLE: "child", TAG_CATEGORY: category, TAG_PARENT: self.parent.run_id,
                **(key_tags or {})}
        return open_run(client(self.uri), self.uri, self.experiment_id, name, tags, {"category": category, **params},
                        key=(TAG_ROLE, TAG_PARENT, TAG_CATEGORY, *(key_tags or {})))

    def category_run(self, category: str, cfg: Config, fingerprint: str) -> RunRef:
        """The run of one train-all category: the same category and configuration share one run."""
        return self.child(category, category, config_params(cfg), {TAG_FINGERPRINT: fingerprint})

    def find_child(self, tags: dict[str, str]) -> RunRef | None:
        found = find_run(client(self.uri), self.experiment_id, tags)
        return RunRef(self.uri, found) if found else None
