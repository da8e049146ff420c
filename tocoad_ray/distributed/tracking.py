"""MLflow run tracking of the Ray jobs (``tocoad train-all``, ``tocoad tune``; docs/tracking.md).

train-all: the driver makes the experiment, the job's run and one run per category
(``tocoad_ray.tracking``) and hands each category task its run; the task's stages log every epoch
from Ray Train's controller (``EpochLogger``, a ``ray.train.UserCallback``: rank 0's report, which
carries the validation scores) and the task logs the final metrics; the driver adds the report and
plots and closes the runs. The tasks run on any node, so a file store must be on a folder every
node mounts (checked with the output folder before any work).

tune: Ray Tune's ``MLflowLoggerCallback`` (``TrialRuns``) logs each trial from the Tune driver,
nested under the search's run; after the selection the driver adds each trial's full config, its
test metrics where it was evaluated, the default configuration's run per category and the report.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.train import UserCallback

from ..config import Config
from ..tracking import (ALLOW_FILE_STORE, TAG_CATEGORY, TAG_JOB, TAG_PARENT, TAG_ROLE, TAG_TRIAL, JobTracker, RunRef,
                        client, config_params, epoch_metrics, experiment_name, find_run, numeric, require_mlflow,
                        store_folder, tracking_uri)

logger = logging.getLogger(__name__)


class EpochLogger(UserCallback):
    """Ray Train callback (runs in the stage's controller): each epoch's report of rank 0 into a
    category's run, as ``<stage>/<metric>`` at step = epoch. Tracking never stops training: a
    failed write is a warning."""

    def __init__(self, run: RunRef):
        self.run = run

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if not metrics:
            return
        epoch, values = epoch_metrics(metrics[0])
        try:
            self.run.log_metrics(values, step=epoch)
        except Exception as e:  # noqa: BLE001 - tracking is best effort once the job runs
            logger.warning("tracking: epoch %d not logged to MLflow: %s", epoch, e)


@dataclass
class TrainAllTracking:
    """train-all's experiment, job run and category runs."""

    tcfg: Any
    out: Path
    uri: str
    job: JobTracker | None = None
    runs: dict[str, RunRef] = field(default_factory=dict)

    @classmethod
    def plan(cls, cfg: Config, out: Path) -> "TrainAllTracking":
        """Before anything starts: mlflow must be installed (a one-line error otherwise)."""
        require_mlflow()
        return cls(cfg.tracking, Path(out), tracking_uri(cfg.tracking, out))

    def folders(self) -> dict[str, str]:
        """A file store's folder, for the storage check on every node (tasks log from any node)."""
        folder = store_folder(self.uri)
        return {"tracking.uri": folder} if folder else {}

    def start(self, cfg: Config, fingerprints: dict[str, str]) -> str:
        self.job = JobTracker.start(self.tcfg, "train-all", self.out, cfg)
        self.runs = {cat: self.job.category_run(cat, cfg, fp) for cat, fp in fingerprints.items()}
        return (f"tracking in MLflow {self.uri}, experiment {experiment_name(self.tcfg, 'train-all', self.out)!r} "
                f"(mlflow ui --backend-store-uri {self.uri})")

    def finish(self, report: dict[str, Any], out: Path) -> None:
        """Loss plots and results into the category runs, the report into the job's; runs closed."""
        for cat, run in self.runs.items():
            r = report["categories"].get(cat, {})
            try:
                run.log_artifact(out / "work" / cat / "losses.png")
                if r.get("status") != "ok":
                    run.set_tag("tocoad.error", str(r.get("error", "?")))
                run.finish("FINISHED" if r.get("status") == "ok" else "FAILED")
            except Exception as e:  # noqa: BLE001
                logger.warning("tracking: run of %s not closed: %s", cat, e)
        ok = [r["metrics"] for r in report["categories"].values() if r.get("status") == "ok" and r.get("metrics")]
        means = {f"mean/{k}": sum(m[k] for m in ok) / len(ok) for k in ("image_auroc", "pixel_auroc", "aupro")
                 if ok and all(isinstance(m.get(k), (int, float)) for m in ok)}
        parent = self.job.parent
        parent.log_metrics({**means, "categories_ok": len(ok), "categories": len(report["categories"])})
        for name in ("report.md", "report.json", "config.yaml"):
            parent.log_artifact(out / name)
        parent.finish("FINISHED" if len(ok) == len(report["categories"]) else "FAILED")


def log_category_result(run: RunRef, result: dict[str, Any], work: Path, say) -> None:
    """A finished category's final metrics and files into its run (best effort)."""
    from ..tracking import final_metrics

    try:
        run.log_metrics(final_metrics(result), step=0)
        run.log_artifact(work / "result.json")
        if result.get("artifact"):
            run.log_artifact(Path(result["artifact"]) / "train" / "train_log.jsonl")
    except Exception as e:  # noqa: BLE001
        say(f"tracking: result not logged to MLflow: {type(e).__name__}: {e}")


class TrialRuns(MLflowLoggerCallback):
    """Ray Tune's MLflow callback: a run per trial nested under the search's run, tagged with its
    category and trial id, found again (not duplicated) when a search is resumed."""

    def __init__(self, uri: str, experiment: str, parent_run_id: str):
        super().__init__(tracking_uri=uri, experiment_name=experiment,
                         tags={TAG_JOB: "tune", TAG_ROLE: "child", TAG_PARENT: parent_run_id})
        self.parent_run_id = parent_run_id

    def setup(self, *args, **kwargs):
        if store_folder(self.tracking_uri) is not None:
            import os

            os.environ.setdefault(ALLOW_FILE_STORE, "true")
        super().setup(*args, **kwargs)

    def log_trial_start(self, trial) -> None:
        if trial not in self._trial_runs:
            c = client(self.tracking_uri)
            found = find_run(c, self.mlflow_util.experiment_id, {TAG_PARENT: self.parent_run_id,
                                                                 TAG_TRIAL: trial.trial_id})
            if found is None:
                tags = {**self.tags, "trial_name": str(trial), TAG_TRIAL: trial.trial_id,
                        TAG_CATEGORY: str(trial.config.get("category"))}
                found = self.mlflow_util.start_run(tags=tags, run_name=str(trial)).info.run_id
            self._trial_runs[trial] = found
        super().log_trial_start(trial)


@dataclass
class TuneTracking:
    """tune's experiment and search run; the trials' runs come from ``TrialRuns``."""

    tcfg: Any
    out: Path
    uri: str
    job: JobTracker | None = None

    @classmethod
    def plan(cls, cfg: Config, out: Path) -> "TuneTracking":
        require_mlflow()
        return cls(cfg.tracking, Path(out), tracking_uri(cfg.tracking, out))

    def start(self, cfg: Config) -> tuple[str, TrialRuns]:
        self.job = JobTracker.start(self.tcfg, "tune", self.out, cfg)
        name = experiment_name(self.tcfg, "tune", self.out)
        return (f"tracking in MLflow {self.uri}, experiment {name!r} (mlflow ui --backend-store-uri {self.uri})",
                TrialRuns(self.uri, name, self.job.parent.run_id))

    def finish(self, grid, rows: list[dict[str, Any]], base: Config, apply_params, out: Path) -> None:
        """Each trial's full config, test metrics and result; the default runs; the report."""
        for r, row in zip(grid, rows):
            trial_id = (r.metrics or {}).get("trial_id")
            run = self.job.find_child({TAG_PARENT: self.job.parent.run_id, TAG_TRIAL: str(trial_id)}) if trial_id else None
            if run is None:
                continue
            self._log_row(run, row, apply_params(base, row["params"]), skip=set(row["params"]) | {"category"})
        for row in rows[len(grid):]:  # the default configuration of each category, run after the search
            run = self.job.child(f"default {row['category']}", row["category"], config_params(base),
                                 {"tocoad.trial": "default"})
            self._log_row(run, row, None, skip=set())
            run.log_metrics({f"validation/{k}": v for k, v in row.get("validation", {}).items()})
            run.finish()
        parent = self.job.parent
        for name in ("report.md", "report.json", "val_vs_test.png", "search.yaml"):
            parent.log_artifact(out / name)
        for yaml_file in sorted((out / "best").glob("*.yaml")):
            parent.log_artifact(yaml_file, "best")
        parent.finish()

    @staticmethod
    def _log_row(run: RunRef, row: dict[str, Any], cfg: Config | None, skip: set[str]) -> None:
        try:
            if cfg is not None:
                run.log_params({k: v for k, v in config_params(cfg).items() if k not in skip})
            if row.get("test"):
                run.log_metrics({f"test/{k}": v for k, v in numeric(row["test"]).items()})
            if row.get("run") and row.get("category"):
                run.log_artifact(Path(row["run"]) / "work" / row["category"] / "result.json")
        except Exception as e:  # noqa: BLE001
            logger.warning("tracking: trial %s not completed in MLflow: %s", row.get("trial"), e)
