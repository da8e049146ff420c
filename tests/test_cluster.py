"""train-all, tune and serve on a real multi-node Ray cluster (``cluster_harness``): a head with no
task CPUs and worker nodes that share only one folder, through node losses of every kind.

Each job runs as a user runs it: ``tocoad ... --address`` in a subprocess on the head's side, whose
working folder and local disk the worker nodes cannot see.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .cluster_harness import LocalCluster, unavailable
from .ray_fixtures import TINY, tiny_data

ROOT = Path(__file__).resolve().parents[1]
WHY = unavailable()
pytestmark = [pytest.mark.multinode,
              pytest.mark.skipif(WHY is not None, reason=f"the multi-node harness cannot start here: {WHY}")]

# 2 categories × (driver 1 + 2 DDP workers × (0.5 + 1 data task × 0.5)) = 6 CPUs at once
# stage I in 4 one-step epochs: a node can be killed between its checkpoints
CLUSTER_SETS = {**TINY, "distributed.feature_actors": 1, "stage1.epochs": 4, "stage1.max_steps_per_epoch": 1, "distributed.num_workers": 2,
                "distributed.data_tasks": 1, "distributed.category_memory_gb": 1.0, "distributed.max_failures": 2}


def sets(extra: dict | None = None) -> list[str]:
    args = []
    for k, v in {**CLUSTER_SETS, **(extra or {})}.items():
        args += ["--set", f"{k}={json.dumps(v) if v is not None else 'null'}"]
    return args


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start_head()
        c.add_node("a", cpus=4)
        c.add_node("b", cpus=4)
        yield c
    finally:
        c.shutdown()


@pytest.fixture(scope="module")
def shared_data(cluster, data_root) -> Path:
    return tiny_data(data_root, cluster.shared / "data")


def tocoad(cluster: LocalCluster, *args: str, address: bool = True) -> subprocess.Popen:
    """``tocoad ARGS --address CLUSTER`` from the head's local folder; output in ``p.log``."""
    cmd = [sys.executable, "-m", "tocoad_ray.cli", *args]
    if address:
        cmd += ["--address", cluster.address]
    log = cluster.logs / f"{args[0]}-{time.monotonic_ns()}.out"
    p = subprocess.Popen(cmd, cwd=str(cluster.head_local), env=dict(cluster.env), stdout=log.open("w"),
                         stderr=subprocess.STDOUT)
    p.log = log
    return p


def finish(p: subprocess.Popen, timeout: float = 900) -> tuple[int, str]:
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        pytest.fail(f"timed out after {timeout:.0f} s:\n{p.log.read_text()[-4000:]}")
    return p.returncode, p.log.read_text()


def wait_for(condition, p: subprocess.Popen, what: str, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if p.poll() is not None:
            pytest.fail(f"the job ended before {what}:\n{p.log.read_text()[-4000:]}")
        time.sleep(0.3)
    p.kill()
    pytest.fail(f"timed out waiting for {what}:\n{p.log.read_text()[-4000:]}")


class NodeSampler:
    """Which harness nodes had processes matching ``needle`` while a job ran (sampled twice a second)."""

    def __init__(self, cluster: LocalCluster, needle: str):
        import threading

        self.seen: list[set[str]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(cluster, needle), daemon=True)
        self._t.start()

    def _run(self, cluster, needle):
        while not self._stop.wait(0.5):
            self.seen.append(set(cluster.find_processes(needle).values()))

    def stop(self) -> list[set[str]]:
        self._stop.set()
        self._t.join()
        return self.seen


def registered_epoch(storage: Path, run_prefix: str) -> int:
    """The epoch of the newest checkpoint Ray Train registered for a run (what a restart resumes)."""
    best = 0
    for snap in storage.glob(f"{run_prefix}-*/checkpoint_manager_snapshot.json"):
        try:
            best = max(best, int(json.loads(snap.read_text())["latest_checkpoint_result"]["metrics"]["epoch"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return best


def same_as_reference(out: Path, reference: Path, cat: str) -> None:
    assert metrics_of(out, cat) == metrics_of(reference, cat), cat
    for art in ("artifacts", "baseline"):
        a, b = out / art / cat / "bank.safetensors", reference / art / cat / "bank.safetensors"
        assert a.read_bytes() == b.read_bytes(), (art, cat)


def metrics_of(out: Path, cat: str) -> dict:
    """A category's test metrics without its timings."""
    m = json.loads((out / "work" / cat / "result.json").read_text())["metrics"]
    return {k: v for k, v in m.items() if not k.endswith("_s") and k != "ms_per_image"}


# -- storage ------------------------------------------------------------------------------------

def test_head_local_output_stops_within_seconds_naming_folder_and_node(cluster, shared_data):
    out = cluster.head_local / "out"  # the driver sees it, no worker node does
    t = time.monotonic()
    code, log = finish(tocoad(cluster, "train-all", "--data", str(shared_data), "--categories", "bottle",
                              "--out", str(out), *sets()), timeout=120)
    took = time.monotonic() - t
    assert code == 2, log
    assert took < 30, f"took {took:.0f} s"
    assert f"output folder (--out) {out} is not the driver's storage there" in log, log
    ids = cluster.ray_node_ids()
    assert ids["a"][:12] in log and ids["b"][:12] in log, log  # every worker node is named
    # nothing was trained: no checkpoints, no category folder
    assert not (out / "ray").exists() or not any((out / "ray").iterdir())
    assert not (out / "work").exists()


def test_head_local_storage_path_and_missing_data_are_named(cluster, shared_data):
    out = cluster.shared / "out-storage"
    code, log = finish(tocoad(cluster, "train-all", "--data", str(shared_data), "--categories", "bottle",
                              "--out", str(out), *sets({"distributed.storage_path": str(cluster.head_local / "ckpt")})),
                       timeout=120)
    assert code == 2 and f"distributed.storage_path {cluster.head_local / 'ckpt'}" in log, log
    # data only the driver can read
    local_data = tiny_data(Path(os.environ.get("TOCOAD_DATA", ROOT.parent / "shared" / "data")),
                           cluster.head_local / "data")
    code, log = finish(tocoad(cluster, "train-all", "--data", str(local_data), "--categories", "bottle",
                              "--out", str(out), *sets()), timeout=120)
    assert code == 2 and f"data root (--data) {local_data} does not exist there" in log, log


# -- train-all ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def single_node_reference(cluster, shared_data, tmp_path_factory) -> Path:
    """The same two categories on one node (a local Ray instance, no cluster)."""
    out = tmp_path_factory.mktemp("single") / "out"
    code, log = finish(tocoad(cluster, "train-all", "--data", str(shared_data), "--categories", "bottle,metal_plate",
                              "--out", str(out), "--interval", "2", *sets(), address=False))
    assert code == 0, log
    return out


def test_train_all_across_nodes_equals_one_node(cluster, shared_data, single_node_reference):
    """2 categories, 2 DDP workers each spread over both nodes, checkpoints through a ``file://``
    storage URI: the same metrics and banks as one node."""
    out = cluster.shared / "out"
    storage = f"file://{cluster.shared / 'checkpoints'}"
    p = tocoad(cluster, "train-all", "--data", str(shared_data), "--categories", "bottle,metal_plate",
               "--out", str(out), "--interval", "2",
               *sets({"distributed.placement_strategy": "SPREAD", "distributed.storage_path": storage}))
    workers = NodeSampler(cluster, "RayTrainWorker")
    code, log = finish(p)
    assert code == 0, log
    assert any(s >= {"a", "b"} for s in workers.stop()), "the DDP workers never ran on both nodes"
    assert f"storage {storage} checked on every node" in log
    assert list((cluster.shared / "checkpoints").glob("bottle-train-*/checkpoint_*"))  # Ray wrote through the URI
    assert not (out / "ray").exists()
    report = json.loads((out / "report.json").read_text())
    for cat in ("bottle", "metal_plate"):
        r = report["categories"][cat]
        assert r["status"] == "ok" and r["histories"]["stage1"][0]["workers"] == 2
        same_as_reference(out, single_node_reference, cat)


# -- node losses --------------------------------------------------------------------------------

def test_losing_the_node_of_a_categorys_driver_retries_it_and_resumes(cluster, shared_data, single_node_reference):
    """SIGKILL every process of the node running metal_plate's driver task once stage I has a
    checkpoint: the task is retried on another node, resumes, and ends as on one node."""
    out = cluster.shared / "out-driver-loss"
    p = tocoad(cluster, "train-all", "--data", str(shared_data), "--categories", "metal_plate", "--out", str(out),
               "--interval", "1", *sets())
    wait_for(lambda: registered_epoch(out / "ray", "metal_plate-train") >= 1, p, "a stage I checkpoint")
    drivers = cluster.find_processes("ray::train_category_safe")
    assert len(set(drivers.values())) == 1, drivers
    lost = next(iter(drivers.values()))
    cluster.kill_node(lost)
    cluster.add_node(f"{lost}-new", cpus=4)  # the cluster keeps its size, as an autoscaler would
    code, log = finish(p)
    assert code == 0, log
    r = json.loads((out / "report.json").read_text())["categories"]["metal_plate"]
    assert r["status"] == "ok", r
    assert max(r["resumed_from"]["stage1"] + r["resumed_from"].get("stage2", [])) >= 1, r  # not from scratch
    same_as_reference(out, single_node_reference, "metal_plate")


def test_losing_a_training_node_restarts_its_workers_elsewhere(cluster, shared_data, single_node_reference):
    """Drivers pinned to one node, training workers to others (custom resources); the workers'
    node is killed mid stage I: the worker group restarts on a new node from the checkpoint."""
    cluster.add_node("drivers", cpus=2, resources={"driver_slot": 10})
    cluster.add_node("trainers", cpus=4, resources={"trainer_slot": 10})
    out = cluster.shared / "out-worker-loss"
    p = tocoad(cluster, "train-all", "--data", str(shared_data), "--categories", "metal_plate", "--out", str(out),
               "--interval", "1", *sets({"distributed.driver_resources": {"driver_slot": 1},
                                         "distributed.worker_resources": {"trainer_slot": 1}}))
    wait_for(lambda: registered_epoch(out / "ray", "metal_plate-train") >= 1, p, "a stage I checkpoint")
    workers = set(cluster.find_processes("RayTrainWorker").values())
    assert "trainers" in workers, workers
    cluster.kill_node("trainers")
    cluster.add_node("trainers-new", cpus=4, resources={"trainer_slot": 10})
    code, log = finish(p)
    assert code == 0, log
    r = json.loads((out / "report.json").read_text())["categories"]["metal_plate"]
    assert r["status"] == "ok", r
    assert max(r["resumed_from"]["stage1"] + r["resumed_from"].get("stage2", [])) >= 1, r  # not from scratch
    same_as_reference(out, single_node_reference, "metal_plate")
    for name in ("drivers", "trainers-new"):  # back to the module's shape
        cluster.kill_node(name)


# -- serve --------------------------------------------------------------------------------------

def _score_all(client, paths) -> list:
    out = []
    for p in paths:
        r = client.post("/v1/products/bottle/score", content=Path(p).read_bytes())
        out.append(r.json()["score"] if r.status_code == 200 else r.status_code)
    return out


def test_serve_shards_on_two_nodes_survive_losing_one(cluster, shared_data):
    """One product, its bank in 2 shards on 2 different nodes; the node of one shard is killed: the
    replicas restart elsewhere and the service scores the same again, with no 5xx once recovered."""
    import httpx
    import numpy as np
    import yaml

    from tocoad_ray.config import load_config
    from tocoad_ray.data import load_split
    from tocoad_ray.pipeline import evaluate, fit

    art = cluster.shared / "serve" / "bottle"
    cfg = load_config(None, {"method": "patchcore", "data.image_size": 96, "data.crop_size": None, "bank.coreset_ratio": 0.1,
                             "bank.threshold_images": 4, "bank.batch_size": 4})
    fit(cfg, shared_data, "bottle", art, progress=False, log=lambda *_: None)
    ref = evaluate(art, shared_data, "bottle", progress=False, return_arrays=True)
    paths = [s.path for s in load_split(shared_data, "bottle", "mvtec").test]
    conf = cluster.shared / "serve" / "service.yaml"
    conf.write_text(yaml.safe_dump({
        "products": [{"name": "bottle", "artifact": str(art), "shards": 2}], "poll_interval_s": 0.5,
        "backbone": {"num_cpus": 0.25, "min_replicas": 1, "max_replicas": 1, "max_batch_size": 4},
        "shards": {"num_cpus": 0.5, "min_replicas": 2, "max_replicas": 2},
        "ingress": {"num_cpus": 0.1}, "registry": {"num_cpus": 0.1}}))
    from .cluster_harness import free_port

    port = free_port()
    p = tocoad(cluster, "serve", "--config", str(conf), "--port", str(port), "--proxy", "head")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        def ready() -> bool:
            try:
                return client.post("/v1/products/bottle/score", content=Path(paths[0]).read_bytes()).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, p, "the service to score", timeout=180)
        np.testing.assert_allclose(_score_all(client, paths), ref["_arrays"]["scores"], rtol=1e-5)
        shards = cluster.find_processes("BankShard")
        assert len(set(shards.values())) == 2, shards  # the bank is spread over two nodes
        lost = sorted(set(shards.values()))[0]
        cluster.kill_node(lost)
        cluster.add_node(f"{lost}-serve", cpus=4)
        t = time.monotonic()
        while time.monotonic() - t < 180:
            try:
                if all(not isinstance(s, int) for s in _score_all(client, paths)):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("the service did not recover within 180 s")
        # recovered: every request answers 200 with the single-node scores
        for _ in range(3):
            got = _score_all(client, paths)
            assert all(not isinstance(s, int) for s in got), got
            np.testing.assert_allclose(got, ref["_arrays"]["scores"], rtol=1e-5)
        assert len(set(cluster.find_processes("BankShard").values())) >= 1
    finally:
        client.close()
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()


# -- tune ---------------------------------------------------------------------------------------

TUNE_BASE = {**CLUSTER_SETS, "distributed.num_workers": 1, "distributed.baseline": False, "bank.coreset_ratio": 0.1}
# one trial whose configuration is the default one: the default run after the search reuses it
TUNE_SEARCH = {"num_samples": 1, "max_concurrent_trials": 1, "max_failures": 2, "asha": {"enabled": False},
               "validation": {"fraction": 0.3, "min_images": 2}, "space": {"stage2.lam": {"choice": [0.5]}}}


def _tune_result(out: Path) -> dict:
    entry = json.loads((out / "report.json").read_text())["categories"]["metal_plate"]
    best = entry["best"]
    return {"params": best["params"], "validation": best["validation"],
            "test": {k: v for k, v in best["test"].items() if not k.endswith("_s") and k != "ms_per_image"}}


def test_tune_across_nodes_survives_losing_a_trials_node(cluster, shared_data, tmp_path_factory):
    """A one-trial search on one node, then on the cluster with the trial's node killed once its
    stage I has a checkpoint: the trial is retried elsewhere, resumes, and selects and scores the same."""
    from .test_distributed_tune import _search_file

    search = _search_file(cluster.shared / "search.yaml", TUNE_BASE, TUNE_SEARCH)
    single = tmp_path_factory.mktemp("tune-single") / "out"
    code, log = finish(tocoad(cluster, "tune", "--data", str(shared_data), "--categories", "metal_plate",
                              "--plan", str(search), "--out", str(single), address=False))
    assert code == 0, log
    one = next(r for r in json.loads((single / "report.json").read_text())["trials"] if r["trial"] != "default")
    assert one["reports"] == CLUSTER_SETS["stage1.epochs"] + CLUSTER_SETS["stage2.epochs"] + 1, \
        "one report per epoch of each stage (both in one TorchTrainer run) + the final full-bank score"

    out = cluster.shared / "tune"
    p = tocoad(cluster, "tune", "--data", str(shared_data), "--categories", "metal_plate", "--plan", str(search),
               "--out", str(out))
    wait_for(lambda: max([registered_epoch(d, "metal_plate-train") for d in (out / "runs").glob("*/ray")] or [0]) >= 1,
             p, "the trial's stage I checkpoint")
    trials = set(cluster.find_processes("ImplicitFunc").values())
    assert len(trials) == 1, trials
    lost = trials.pop()
    cluster.kill_node(lost)
    cluster.add_node(f"{lost}-tune", cpus=4)
    code, log = finish(p)
    assert code == 0, log
    report = json.loads((out / "report.json").read_text())
    trial = next(r for r in report["trials"] if r["trial"] != "default")
    assert trial["status"] == "finished", trial
    assert _tune_result(out) == _tune_result(single)
