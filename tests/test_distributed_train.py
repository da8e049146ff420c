"""Stage I / II on Ray Train: one worker reproduces the single-process trainer bit for bit; two
DDP workers are deterministic; a worker killed in stage II is replaced and the run resumes from
its last checkpoint (D included) and ends where an uninterrupted run ends; the per-category driver writes an artifact
that ``tocoad evaluate`` scores exactly as the driver reported."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tocoad_ray.cli import main as cli_main
from tocoad_ray.data import load_split
from tocoad_ray.distributed.category import train_category
from tocoad_ray.distributed.samples import SampleSpec, decode_images, image_store
from tocoad_ray.distributed.stages import run_stage, run_stages
from tocoad_ray.models.backbone import FeatureExtractor
from tocoad_ray.run_report import markdown_report
from tocoad_ray.train import train_tocoad

from .ray_fixtures import ray_local, tiny_cfg, tiny_root  # noqa: F401 - fixtures


@pytest.mark.slow
def test_one_worker_equals_single_process_and_evaluate_agrees(ray_local, tiny_root, tmp_path, capsys):  # noqa: F811
    cfg = tiny_cfg(**{"distributed.num_workers": 1, "distributed.cpus_per_worker": 1.0})
    res = train_category(cfg, tiny_root, "bottle", tmp_path / "run", tmp_path / "run" / "ray")
    assert res["status"] == "ok" and res["workers"] == 1
    assert [h["epoch"] for h in res["histories"]["stage1"]] == [1, 2]
    assert [h["epoch"] for h in res["histories"]["stage2"]] == [1, 2]

    # the reference: the single-process trainer on the same images, at the worker's thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = train_tocoad(cfg, [s.path for s in load_split(tiny_root, "bottle", "mvtec").train], tmp_path / "ref",
                           device="cpu", progress=False, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    got = load_file(str(tmp_path / "run" / "artifacts" / "bottle" / "backbone.safetensors"))
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), f"F tensor {k} differs from the single-process run"
    ref_log = [json.loads(line)["losses"] for line in (tmp_path / "ref" / "train_log.jsonl").read_text().splitlines()]
    assert [h["losses"] for h in res["histories"]["stage1"] + res["histories"]["stage2"]] == ref_log

    # the report's metrics are what `tocoad evaluate` gives for the same artifact
    out = tmp_path / "eval.json"
    assert cli_main(["evaluate", "--artifact", res["artifact"], "--data", str(tiny_root), "--category", "bottle",
                     "--json", str(out), "--quiet"]) == 0
    ev = json.loads(out.read_text())
    for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "threshold"):
        assert ev[k] == res["metrics"][k], k
    assert res["baseline"]["method"] == "patchcore" and res["baseline"]["bank_size"] > 0


def _stage1_inputs(cfg, root):
    paths = [s.path for s in load_split(root, "bottle", "mvtec").train]
    ex = FeatureExtractor(cfg.backbone.name, cfg.backbone.layers, cfg.backbone.weights)
    store = image_store(decode_images(paths, cfg, ex.mean, ex.std), len(paths))
    return store, len(paths), SampleSpec.build(cfg, 1, ex.mean, ex.std)


def _kill_a_worker_in_stage_two(storage: Path, done: threading.Event, killed: list):
    """Real failure: SIGKILL one Ray Train worker process (its process title is
    ``ray::RayTrainWorker``) once the run's controller has registered a stage-II checkpoint (its
    snapshot in storage names one), so the restart must resume stage II with D from it."""
    deadline = time.monotonic() + 300
    while not done.is_set() and time.monotonic() < deadline:
        if any(_registered(p) >= ("stage2", 1) for p in storage.glob("*/checkpoint_manager_snapshot.json")):
            for pid in _train_worker_pids():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.2)


def _registered(snapshot: Path) -> tuple[str, int]:
    """(stage, epoch) of the checkpoint Ray Train has registered for a run."""
    try:
        m = json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]
        return str(m["stage"]), int(m["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return "", 0


def _train_worker_pids() -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return sorted(pids)


@pytest.mark.slow
def test_killed_worker_is_replaced_and_training_resumes_from_checkpoint(ray_local, tiny_root, tmp_path):  # noqa: F811
    """Both stages in one run, a worker killed in stage II: the new worker group resumes stage II
    from its checkpoint (D included, stage I not rerun) and ends where an uninterrupted run ends."""
    cfg = tiny_cfg(**{"stage1.epochs": 2, "stage1.max_steps_per_epoch": 1, "stage2.epochs": 8,
                      "distributed.num_workers": 2, "distributed.max_failures": 1})
    store, n, spec1 = _stage1_inputs(cfg, tiny_root)
    specs = {1: spec1, 2: SampleSpec.build(cfg, 2, spec1.mean, spec1.std)}
    straight = run_stages(cfg, [1, 2], "bottle", store, n, specs, str(tmp_path / "a"))
    assert straight[1].attempts_resumed == straight[2].attempts_resumed == [0]

    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_a_worker_in_stage_two, args=(tmp_path / "c", done, killed))
    killer.start()
    try:
        crashed = run_stages(cfg, [1, 2], "bottle", store, n, specs, str(tmp_path / "c"))
    finally:
        done.set()
        killer.join()
    assert killed, "no worker was killed"
    assert [h["epoch"] for h in crashed[1].history] == [1, 2]
    assert [h["epoch"] for h in crashed[2].history] == list(range(1, 9))
    assert crashed[1].attempts_resumed == [0], "stage I ran again after a failure in stage II"
    assert max(crashed[2].attempts_resumed) >= 1, "the replacement workers did not resume stage II from a checkpoint"
    # the same seed with 2 DDP workers is deterministic, and a resumed run ends where the straight one does
    for s in (1, 2):
        for k, v in straight[s].state["model"].items():
            assert torch.equal(v, crashed[s].state["model"][k]), f"stage {s} {k}: resumed run ended elsewhere"
        assert [h["losses"] for h in straight[s].history] == [h["losses"] for h in crashed[s].history]


@pytest.mark.parametrize("method", ["patchcore", "reconpatch"])
def test_patchcore_and_reconpatch_go_through_the_same_driver(ray_local, tiny_root, tmp_path, method):  # noqa: F811
    cfg = tiny_cfg(method=method, **{"reconpatch.epochs": 1, "reconpatch.batch_size": 64})
    res = train_category(cfg, tiny_root, "metal_plate", tmp_path / "run", tmp_path / "run" / "ray")
    assert res["status"] == "ok" and res["metrics"]["method"] == method
    art = Path(res["artifact"])
    assert (art / "adapter.safetensors").is_file() == (method == "reconpatch")
    assert not (art / "backbone.safetensors").exists() and "stage1" not in res["histories"]
    assert (res["baseline"] is None) == (method == "patchcore")
    meta = json.loads((art / "meta.json").read_text())
    assert meta["n_train_images"] == 6 and meta["bank_size"] > 0


def test_stage_two_keeps_the_best_validating_epoch(ray_local, tiny_root, tmp_path):  # noqa: F811
    """With a validator, stage II returns F of the epoch that scored best (the first on ties), not
    the last one; the objective here is real and cheap: closeness of F to its pretrained weights,
    which training moves away from."""
    cfg = tiny_cfg(**{"stage2.epochs": 3, "distributed.num_workers": 1})
    paths = [s.path for s in load_split(tiny_root, "bottle", "mvtec").train]
    ex = FeatureExtractor(cfg.backbone.name, cfg.backbone.layers, cfg.backbone.weights)
    store = image_store(decode_images(paths, cfg, ex.mean, ex.std), len(paths))

    class Closeness:  # defined here: cloudpickle ships it by value to the Ray Train worker
        def __init__(self, ref):
            self.ref = ref

        def __call__(self, extractor):
            sd = extractor.body.state_dict()
            return {"val_score": -sum(float((sd[k].double() - v.double()).pow(2).sum()) for k, v in self.ref.items())}

    closeness = Closeness({k: v.clone() for k, v in ex.body.state_dict().items()})
    res = run_stage(cfg, 2, "bottle", store, len(paths), SampleSpec.build(cfg, 2, ex.mean, ex.std, with_generator=False),
                    str(tmp_path / "ray"), validator=closeness)
    scores = [h["val_score"] for h in res.history]
    assert len(scores) == 3 and res.best_epoch == 1 + scores.index(max(scores))
    assert [h["best_epoch"] for h in res.history][-1] == res.best_epoch
    # the weights handed back are the ones that scored best ...
    kept = {k[2:]: v for k, v in res.state["model"].items() if k.startswith("F.")}
    ex.body.load_state_dict(kept)
    assert closeness(ex)["val_score"] == pytest.approx(max(scores), rel=1e-9)
    # ... and not the last epoch's, which the run's last checkpoint holds
    assert res.best_epoch < 3
    last = load_file(str(next((tmp_path / "ray").glob("*/checkpoint_*/model_e0003.safetensors"))))
    assert any(not torch.equal(v, last["F." + k]) for k, v in kept.items())


@pytest.mark.slow
def test_train_all_ships_the_baseline_when_fine_tuning_validates_worse(ray_local, tiny_root, tmp_path):  # noqa: F811
    """``distributed.select: validation``: F fine-tuned at a learning rate that wrecks it loses the
    validation contest to frozen-F PatchCore on held-out images, so the category ships PatchCore,
    built on every training image; the fine-tuned F's test metrics are still reported."""
    cfg = tiny_cfg(**{"distributed.select": "validation", "distributed.select_fraction": 0.3,
                      "distributed.select_min_images": 2, "distributed.select_bank_images": 3,
                      "distributed.num_workers": 1, "stage2.lr": 5.0})
    res = train_category(cfg, tiny_root, "bottle", tmp_path / "run", tmp_path / "run" / "ray")
    sel = res["selection"]
    assert sel["mode"] == "validation" and sel["n_held_out"] == 2 and sel["n_validation"] == 4
    assert sel["n_bank_images"] == 3  # the selection banks: 3 of the 4 fitting images
    val = {m: sel["validation"][m]["val_score"] for m in ("tocoad", "patchcore")}
    assert val["patchcore"] > val["tocoad"] and sel["shipped"] == "patchcore" and "validates better" in sel["reason"]
    art = Path(res["artifact"])
    meta = json.loads((art / "meta.json").read_text())
    assert meta["config"]["method"] == "patchcore" and not (art / "backbone.safetensors").exists()
    assert meta["n_train_images"] == 6  # the held-out images join the shipped bank
    assert res["baseline"] == res["metrics"]
    tuned = Path(res["finetuned"]["artifact"])
    assert json.loads((tuned / "meta.json").read_text())["config"]["method"] == "tocoad"
    assert 0.0 <= res["finetuned"]["image_auroc"] <= 1.0
    # F trained without the held-out images, and was validated after every epoch
    assert any("training F on 4" in m for m in res["messages"])
    assert len(res["histories"]["stage2"]) == 2 and all("val_score" in h for h in res["histories"]["stage2"])
    # the report's table: both models with their validation scores and test metrics, and which shipped
    md = markdown_report({"order": ["bottle"], "categories": {"bottle": res}})
    tuned_row, base_row, why = [line for line in md.splitlines() if line.startswith("| bottle |")]
    assert tuned_row.startswith("| bottle | tocoad |") and "| no |" in tuned_row
    assert f"| {val['tocoad']:.4f} |" in tuned_row and f"| {res['finetuned']['aupro']:.3f} |" in tuned_row
    assert "patchcore (frozen F, same run)" in base_row and "| **yes** |" in base_row
    assert f"| {val['patchcore']:.4f} |" in base_row and sel["reason"] in why
