"""``tocoad tune`` on a local Ray instance: tiny searches on real images (64 px, 1-2 steps). The
searches train stage II only (one TorchTrainer per trial); a trial that runs both stages reports
every epoch of each (``test_cluster.py``'s tune test), and trials of several categories run side
by side in ``test_distributed_tracking.py``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from jobs import tune
from tocoad_ray.cli import build_parser
from tocoad_ray.config import ConfigError, load_config
from tocoad_ray.data import DataError
from tocoad_ray.search_space import apply, load_plan

from .ray_fixtures import TINY, kill_when, ray_local, tiny_data  # noqa: F401 - fixtures



BASE = {**TINY, "distributed.num_workers": 1, "distributed.data_tasks": 1, "distributed.category_memory_gb": 1.0,
        "distributed.baseline": False, "bank.coreset_ratio": 0.1, "stage1.enabled": False}
SEARCH = {"num_samples": 2, "max_concurrent_trials": 2,
          "validation": {"fraction": 0.3, "min_images": 2},
          "space": {"stage2.lam": {"uniform": [0.2, 0.8]}, "stage2.lr": {"loguniform": [1e-3, 1e-2]}}}


def _search_file(path: Path, base: dict, search: dict) -> Path:
    data: dict = {}
    for dotted, v in base.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    data["search"] = search
    path.write_text(yaml.safe_dump(data))
    return path


def _unreadable_tests(root: Path) -> dict[Path, Path]:
    """Replace every test image and mask with bytes no image reader accepts; returns what to restore."""
    saved = {}
    for cat in root.iterdir():
        for p in [*(cat / "test").rglob("*.png"), *(cat / "ground_truth").rglob("*.png")]:
            saved[p] = p.resolve()
            p.unlink()
            p.write_bytes(b"this test file must not be read by the search")
    return saved


@pytest.mark.slow
def test_interrupted_search_reads_no_test_file_resumes_then_selects_and_reports(ray_local, data_root, tmp_path):  # noqa: F811
    """2 trials, one after the other, while every test file is garbage (so nothing in the search
    opens one): ``tocoad tune`` is SIGKILLed once the first trial has finished; the same search
    then resumes the experiment, keeps the finished trial (not retrained) and completes the other;
    with the files back, the same call runs the default, evaluates best and default on test and
    writes the YAMLs, the report and the plot. (Several categories at once: ``test_cluster.py`` and
    ``test_distributed_tracking.py``.)"""
    import ray

    root = tiny_data(data_root, tmp_path / "data")
    out = tmp_path / "tune"
    # one trial at a time: the kill lands between the first trial's end and the second's
    search = _search_file(tmp_path / "search.yaml", BASE, {**SEARCH, "max_concurrent_trials": 1})
    saved = _unreadable_tests(root)
    assert saved
    args = ["tune", "--data", str(root), "--categories", "bottle", "--out", str(out), "--plan", str(search)]
    cmd = ["jobs.tune", *args[1:], "--address", ray.get_runtime_context().gcs_address]
    kill_when(cmd, lambda: bool(list((out / "runs").glob("*/work/*/result.json"))), "a trial finished")
    done = list((out / "runs").glob("*/work/*/result.json"))
    assert len(done) == 1, done
    first = done[0]
    stamp = first.stat().st_mtime_ns

    plan = tune.plan_from_args(build_parser().parse_args(args))
    assert plan.val_generator == "nsa"
    messages: list[str] = []
    res = tune.run(plan, str(root), ["bottle"], out, echo=messages.append, select=False)
    assert any("resuming the search" in m for m in messages)
    assert first.stat().st_mtime_ns == stamp, "the trial finished before the interruption was trained again"
    rows = res["trials"]
    assert len(rows) == 2 and {r["category"] for r in rows} == {"bottle"}
    finished = [r for r in rows if r["status"] == "finished"]
    assert finished and all(r["error"] is None for r in rows)
    for r in finished:
        assert 0.0 <= r["validation"]["val_score"] <= 1.0
        result = json.loads((Path(r["run"]) / "work" / r["category"] / "result.json").read_text())
        assert result["validation"]["generator"] == "nsa" and "n_test" not in result["metrics"]
        assert result["n_train"] == 4  # 2 of the 6 training images held out
        if Path(r["run"]) == first.parents[2]:  # ran uninterrupted
            assert r["reports"] == 2 + 1, "one report per epoch + the final full-bank score"
    assert not list(out.rglob("test.json"))

    for p, target in saved.items():
        p.unlink()
        p.symlink_to(target)
    report = tune.run(plan, str(root), ["bottle"], out, echo=lambda m: None)
    assert (out / "report.md").is_file() and (out / "val_vs_test.png").stat().st_size > 10_000
    assert json.loads((out / "report.json").read_text())["order"] == ["bottle"]
    metric = plan.search.metric
    entry = report["categories"]["bottle"]
    best, default = entry["best"], entry["default"]
    # best: the highest validation score among the finished trials and the default, as each run
    # wrote it to its own result.json (a tie keeps the default)
    scored = [default] + [r for r in report["trials"] if r["status"] == "finished"]
    saved_scores = {r["run"]: json.loads((Path(r["run"]) / "work" / "bottle" / "result.json").read_text())
                    ["metrics"][metric] for r in scored}
    top = max(saved_scores.values())
    assert saved_scores[best["run"]] == top == best["validation"][metric]
    assert saved_scores[default["run"]] < top or best["trial"] == "default"
    for x in (best, default):
        assert 0.0 <= x["test"]["image_auroc"] <= 1.0 and x["test"]["n_test"] == 4
    chosen = load_config(entry["best_yaml"])
    assert chosen == apply(plan.base, best["params"])
    assert "spearman" in entry and entry["spearman"]["n_trials"] >= 2
    md = (out / "report.md").read_text()
    assert "Best vs default" in md and "Spearman" in md


@pytest.mark.parametrize("entry, message", [
    ({"stage2.lamb": {"uniform": [0.1, 0.9]}}, r"stage2.lamb\]: not a config key"),
    ({"stage2.lam": {"uniform": [0.1, 1.5]}}, r"stage2.lam\]: value 1.5 is invalid"),
    ({"stage1.epochs": {"uniform": [1, 3]}}, r"stage1.epochs\]: value 1.0 is invalid.*integer"),
    ({"generator.kind": {"choice": ["perlin", "gauss"]}}, r"generator.kind\]: value 'gauss' is invalid"),
    ({"backbone.stage2_layers": {"choice": [["blocks.9"]]}}, r"no feature layer"),
    ({"stage2.trainable_from": {"choice": ["blocks.2", "blocks.9"]}}, r"value 'blocks.9' is invalid.*no feature layer"),
    ({"stage2.lr": {"loguniform": [0.0, 0.1]}}, r"loguniform needs low > 0"),
    ({"stage2.lr": {"normal": [0.0, 0.1]}}, r"unknown distribution 'normal'"),
    ({"reconpatch.alpha": {"uniform": [0.1, 0.9]}}, r"no effect with method 'tocoad'"),
    ({"distributed.num_workers": {"choice": [1, 2]}}, r"not a search dimension"),
])
def test_bad_search_entry_is_a_clear_error_before_any_trial(entry, message, tmp_path):
    path = _search_file(tmp_path / "s.yaml", BASE, {**SEARCH, "space": entry})
    with pytest.raises(ConfigError, match=message):
        load_plan(path)


def test_bad_plan_or_data_stops_before_ray(tmp_path, data_root):
    root = tiny_data(data_root, tmp_path / "data")
    with pytest.raises(ConfigError, match="also a training generator"):
        load_plan(_search_file(tmp_path / "s.yaml", BASE, {**SEARCH, "validation": {"generator": "perlin"}}))
    plan = load_plan(_search_file(tmp_path / "s.yaml", BASE, SEARCH))
    with pytest.raises(DataError):
        tune.run(plan, str(root), ["bottle", "no_such_category"], tmp_path / "a", echo=lambda m: None)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "search.yaml").write_text("method: patchcore\n")
    with pytest.raises(ConfigError, match="another plan"):
        tune.run(plan, str(root), ["bottle"], tmp_path / "b", echo=lambda m: None)
    assert not (tmp_path / "a" / "search").exists() and not (tmp_path / "b" / "search").exists()
