"""Run tracking in MLflow: a tiny ``train-all`` (run by tests/test_distributed_train_all.py with
tracking on, checked by the helpers here) and a tiny ``tune`` on a local Ray instance write
a file store that mlflow's own client reads back: one experiment per output folder, the job's
run, one nested run per category / trial with its config, per-epoch stage losses, validation
scores, final metrics and files; a resumed train-all logs into the runs it started."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tocoad_ray.config import ConfigError, load_config
from tocoad_ray.distributed.category import category_fingerprint
from tocoad_ray.tracking import (
    TAG_CATEGORY,
    TAG_PARENT,
    TAG_ROLE,
    TAG_TRIAL,
    client,
    require_mlflow,
    tracking_uri,
)

from .ray_fixtures import TINY, ray_local, tiny_cfg, tiny_root  # noqa: F401 - fixtures
from .test_distributed_tune import _search_file


def _runs(uri: str, experiment: str):
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {uri}"
    return c, exp, c.search_runs([exp.experiment_id], max_results=100)


def _artifacts(c, run_id: str, path: str | None = None) -> set[str]:
    return {Path(a.path).name for a in c.list_artifacts(run_id, path)}


def test_off_by_default_fingerprint_and_missing_mlflow(monkeypatch, tmp_path):
    from jobs.train_all import config_from_args
    from tocoad_ray.cli import build_parser

    cfg = load_config(None)
    assert not cfg.tracking.enabled and cfg.tracking.uri is None
    assert config_from_args(build_parser().parse_args(["train-all", "--track"])).tracking.enabled
    on = load_config(None, {"tracking.enabled": True, "tracking.uri": "http://mlflow:5000"})
    assert category_fingerprint(on, "d", "bottle") == category_fingerprint(cfg, "d", "bottle")
    assert tracking_uri(cfg.tracking, tmp_path) == (tmp_path / "mlruns").resolve().as_uri()
    assert tracking_uri(on.tracking, tmp_path) == "http://mlflow:5000"
    with pytest.raises(ConfigError, match="tracking.uri"):
        load_config(None, {"tracking.uri": " "})
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as on an install without the extra
    with pytest.raises(ConfigError, match=r'pip install "tocoad-ray\[tracking\]"'):
        require_mlflow()


def assert_train_all_tracked(out: Path, report: dict, cats: list[str], job_status: str = "FINISHED") -> list:
    """The MLflow store of a tracked train-all run (tests/test_distributed_train_all.py runs it with
    tracking on): the job's run, one nested run per category with its config, per-epoch losses of
    both stages, final metrics and files. Returns the runs."""
    uri = (out / "mlruns").resolve().as_uri()
    c, exp, runs = _runs(uri, f"train-all {out.resolve()}")
    parents = [r for r in runs if r.data.tags.get(TAG_ROLE) == "job"]
    children = {r.data.tags.get(TAG_CATEGORY): r for r in runs if r.data.tags.get(TAG_ROLE) == "child"}
    assert len(parents) == 1 and set(cats) <= set(children)
    parent = parents[0]
    assert parent.info.status == job_status and parent.data.params["method"] == "tocoad"
    assert {"report.md", "report.json", "config.yaml"} <= _artifacts(c, parent.info.run_id)
    for cat in cats:
        r, res = children[cat], report["categories"][cat]
        assert r.data.tags[TAG_PARENT] == parent.info.run_id and r.info.status == "FINISHED"
        # params: the config the category ran with, as --set keys
        assert r.data.params["stage1.epochs"] == "2" and r.data.params["data.image_size"] == "64"
        assert r.data.params["category"] == cat and "tracking.enabled" not in r.data.params
        # per-epoch losses of both stages (step = epoch), as in the category's history
        for stage in ("stage1", "stage2"):
            hist = c.get_metric_history(r.info.run_id, f"{stage}/loss")
            assert [m.step for m in sorted(hist, key=lambda m: m.step)] == [1, 2]
            want = [h["losses"]["loss"] for h in res["histories"][stage]]
            assert [m.value for m in sorted(hist, key=lambda m: m.step)] == pytest.approx(want)
        # final metrics: the method's and the baseline's, equal to the report's
        for k in ("image_auroc", "pixel_auroc", "aupro", "threshold"):
            assert r.data.metrics[k] == pytest.approx(res["metrics"][k])
        assert r.data.metrics["baseline/image_auroc"] == pytest.approx(res["baseline"]["image_auroc"])
        assert {"losses.png", "result.json", "train_log.jsonl"} <= _artifacts(c, r.info.run_id)

    return runs


def assert_rerun_reused(out: Path, runs: list, cats: list[str]) -> None:
    """A re-run of the same train-all logs into the runs it already created (not duplicates) and
    closes them: the job's run and those of ``cats`` end FINISHED."""
    _, _, runs2 = _runs((out / "mlruns").resolve().as_uri(), f"train-all {out.resolve()}")
    assert {r.info.run_id for r in runs2} == {r.info.run_id for r in runs}
    assert all(r.info.status == "FINISHED" for r in runs2
               if r.data.tags.get(TAG_ROLE) == "job" or r.data.tags.get(TAG_CATEGORY) in cats)


def test_tune_trials_appear_as_runs(ray_local, tiny_root, tmp_path):  # noqa: F811
    """Two categories searched side by side (their trials share the Tuner): one nested run per
    trial under the job's run, the default's run, the best trial's test metrics and the files."""
    from jobs import tune
    from tocoad_ray.search_space import load_plan

    base = {**TINY, "method": "patchcore", "bank.coreset_ratio": 0.1, "distributed.category_memory_gb": 1.0,
            "distributed.baseline": False, "tracking.enabled": True}
    _search_file(tmp_path / "plan.yaml", base, {
        "num_samples": 2, "max_concurrent_trials": 2, "validation": {"fraction": 0.3, "min_images": 2},
        "space": {"bank.num_neighbors": {"choice": [1, 3]}}})
    out = tmp_path / "tune"
    cats = ["bottle", "metal_plate"]
    report = tune.run(load_plan(tmp_path / "plan.yaml"), str(tiny_root), cats, out, echo=lambda m: None)
    assert report["order"] == cats and all(report["categories"][c]["best"] is not None for c in cats)
    c, exp, runs = _runs((out / "mlruns").resolve().as_uri(), f"tune {out.resolve()}")
    parent = next(r for r in runs if r.data.tags.get(TAG_ROLE) == "job")
    trials = [r for r in runs if TAG_TRIAL in r.data.tags]
    assert len(trials) == 4 and all(r.data.tags[TAG_PARENT] == parent.info.run_id for r in trials)
    assert sorted(r.data.tags[TAG_CATEGORY] for r in trials) == ["bottle", "bottle", "metal_plate", "metal_plate"]
    for r in trials:
        assert r.info.status == "FINISHED" and r.data.params["category"] == r.data.tags[TAG_CATEGORY]
        assert r.data.params["bank.num_neighbors"] in ("1", "3")
        assert r.data.params["method"] == "patchcore"  # the full config, added after the search
        assert 0.0 <= r.data.metrics["val_score"] <= 1.0
        assert "result.json" in _artifacts(c, r.info.run_id)
    # a best trial was evaluated on test: its run holds the test metrics
    assert any("test/image_auroc" in r.data.metrics for r in trials)
    default = [r for r in runs if r.data.tags.get("tocoad.trial") == "default"]
    assert len(default) == 2 and all("validation/val_score" in d.data.metrics for d in default)
    assert {"report.md", "report.json", "search.yaml"} <= _artifacts(c, parent.info.run_id)
    assert {"bottle.yaml", "metal_plate.yaml"} <= _artifacts(c, parent.info.run_id, "best")
