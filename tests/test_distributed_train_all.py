"""``tocoad train-all``: several real categories concurrently on a local Ray instance with two
DDP workers each, a failing category reported while the others finish, the report's metrics equal
to ``tocoad evaluate``, and a re-run that skips finished categories and resumes interrupted ones."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from jobs.train_all import config_from_args, run
from tocoad_ray.cli import build_parser
from tocoad_ray.cli import main as cli_main
from tocoad_ray.config import ConfigError
from tocoad_ray.data import list_categories

from .ray_fixtures import TINY, corrupt_category, kill_when, ray_local, tiny_cfg, tiny_data  # noqa: F401 - fixtures
from .test_distributed_tracking import assert_rerun_reused, assert_train_all_tracked



def test_main_job_defaults_parse():
    args = build_parser().parse_args(["train-all"])
    cfg = config_from_args(args)
    assert cfg.method == "tocoad" and cfg.data.layout == "elpv" and cfg.distributed.num_workers == 2
    assert cfg.stage1.enabled and cfg.stage2.enabled
    assert cfg.distributed.select == "validation" and cfg.stage2.keep_best  # ships what validates better
    with pytest.raises(ConfigError, match="distributed.select"):
        config_from_args(build_parser().parse_args(["train-all", "--set", "distributed.select=test"]))
    assert list_categories(None, "elpv") == ["mono", "poly"]
    with pytest.raises(ConfigError, match="distributed.num_workers"):
        config_from_args(build_parser().parse_args(["train-all", "--set", "distributed.num_workers=0"]))


@pytest.mark.slow
def test_train_all_concurrent_categories_report_and_rerun(ray_local, data_root, tmp_path, capsys):  # noqa: F811
    root = corrupt_category(tiny_data(data_root, tmp_path / "data"))
    cfg = tiny_cfg(**{"distributed.num_workers": 2, "tracking.enabled": True})
    out = tmp_path / "run"
    lines: list[str] = []
    report = run(cfg, str(root), ["bottle", "metal_plate", "broken"], out, interval_s=2, echo=lines.append)
    cats = report["categories"]
    assert cats["broken"]["status"] == "failed" and "broken/train/good/001.png" in cats["broken"]["error"]
    for cat in ("bottle", "metal_plate"):
        r = cats[cat]
        assert r["status"] == "ok", r
        assert r["workers"] == 2 and len(r["histories"]["stage1"]) == 2 and len(r["histories"]["stage2"]) == 2
        assert r["histories"]["stage1"][0]["workers"] == 2
        assert r["baseline"]["method"] == "patchcore"
        # the report's metrics are exactly what `tocoad evaluate` gives for the same artifact (at
        # the driver's thread count: float sums in F depend on it)
        ev = tmp_path / f"{cat}.json"
        threads = torch.get_num_threads()
        torch.set_num_threads(int(cfg.distributed.driver_cpus))
        try:
            assert cli_main(["evaluate", "--artifact", str(out / "artifacts" / cat), "--data", str(root), "--category",
                             cat, "--json", str(ev), "--quiet"]) == 0
        finally:
            torch.set_num_threads(threads)
        got = json.loads(ev.read_text())
        for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "threshold"):
            assert got[k] == r["metrics"][k], (cat, k)
        assert (out / "work" / cat / "losses.png").stat().st_size > 1000
    # both categories ran at the same time: their stage-I runs overlap in time
    assert any("bottle: stage1" in l for l in lines) and any("metal_plate: stage1" in l for l in lines)
    md = (out / "report.md").read_text()
    assert "patchcore (frozen F, same run)" in md and "| broken | **failed** |" in md
    assert json.loads((out / "report.json").read_text())["config"]["distributed"]["num_workers"] == 2
    runs = assert_train_all_tracked(out, report, ["bottle", "metal_plate"], job_status="FAILED")  # MLflow

    # the same command again: finished categories are skipped, not retrained
    t = time.perf_counter()
    again = run(cfg, str(root), ["bottle", "metal_plate"], out, interval_s=1, echo=lambda m: None)
    assert all(again["categories"][c].get("skipped") for c in ("bottle", "metal_plate"))
    assert again["categories"]["bottle"]["metrics"] == cats["bottle"]["metrics"]
    assert time.perf_counter() - t < 60
    assert_rerun_reused(out, runs, ["bottle", "metal_plate"])


def _registered_epoch(snapshot: Path) -> int:
    """Epoch of the checkpoint Ray Train has registered for a run (what a restart resumes from)."""
    try:
        return int(json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


@pytest.mark.slow
def test_interrupted_train_all_resumes(ray_local, data_root, tmp_path):  # noqa: F811
    """Kill the job (SIGKILL) once its category has a checkpoint; the same command then resumes
    that checkpoint instead of starting over (a finished category is skipped: the rerun of
    ``test_train_all_concurrent_categories_report_and_rerun``)."""
    import ray

    root = tiny_data(data_root, tmp_path / "data")
    out = tmp_path / "run"
    sets = [f"{k}={json.dumps(v) if v is not None else 'null'}" for k, v in TINY.items()]
    # no frozen-F baseline: what is checked here is the method's resume
    sets += ["stage1.epochs=6", "stage1.max_steps_per_epoch=1", "distributed.num_workers=1", "distributed.baseline=false"]
    cmd = ["jobs.train_all", "--data", str(root), "--categories", "metal_plate",
           "--out", str(out), "--interval", "1", "--address", ray.get_runtime_context().gcs_address]
    for s in sets:
        cmd += ["--set", s]

    def interrupt_point() -> bool:  # a checkpoint registered by Ray Train (what a restart resumes)
        snapshots = (out / "ray").glob("metal_plate-train-*/checkpoint_manager_snapshot.json")
        return any(_registered_epoch(p) >= 1 for p in snapshots)

    kill_when(cmd, interrupt_point, "the interrupt point (a registered checkpoint of metal_plate)")
    assert not (out / "work" / "metal_plate" / "result.json").exists()

    args = build_parser().parse_args(["train-all", "--data", str(root), "--out", str(out), "--categories",
                                      "metal_plate"] + [a for s in sets for a in ("--set", s)])
    report = run(config_from_args(args), str(root), ["metal_plate"], out, interval_s=1, echo=lambda m: None)
    m = report["categories"]["metal_plate"]
    assert m["status"] == "ok" and len(m["histories"]["stage1"]) == 6 and len(m["histories"]["stage2"]) == 2
    # resumed from the run's checkpoint (in stage I, or in stage II with D from it), not from scratch
    assert max(m["resumed_from"]["stage1"] + m["resumed_from"]["stage2"]) >= 1, m["resumed_from"]
