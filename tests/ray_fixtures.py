"""One local Ray instance shared by the modules that train on it (started on first use, kept across
modules: its worker processes have imported torch once), and small real-data category trees for
the distributed tests. Modules that need Ray started their own way (Serve, S3 credentials) call
``release_shared_ray()`` first."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from tocoad_ray.config import load_config

from ._subset import mvtec_subset

ROOT = Path(__file__).resolve().parents[1]

# tiny ToCoAD: 64 px, batch 4, 2 epochs of 1-2 steps per stage: seconds per step on 2 CPUs
TINY = {
    "method": "tocoad", "data.image_size": 64, "data.crop_size": None,
    "stage1.epochs": 2, "stage1.batch_size": 4, "stage1.max_steps_per_epoch": 2,
    "stage2.epochs": 2, "stage2.batch_size": 4, "stage2.max_steps_per_epoch": 1,
    "bank.batch_size": 4, "distributed.cpus_per_worker": 0.5, "distributed.data_cpus": 0.5,
    "distributed.data_tasks": 1,  # one G process per worker: each new process costs seconds of imports
    "distributed.feature_actors": 0,  # the bank's features in the category task: no actor to start
    # ship the fine-tuned F without the validation contest (its own test: test_distributed_train.py)
    "distributed.select": "none",
}


def tiny_cfg(**overrides):
    return load_config(None, {**TINY, **overrides})


_SHARED = {"running": False}


def start_ray():
    """The shared instance, with the dashboard: Ray Train frees the placement group of a tune
    trial ASHA stopped mid-stage only when the state API can tell that its controller died (as
    ``tocoad tune`` starts it)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if not _SHARED["running"] and not ray.is_initialized():  # (an instance a CLI test started: reuse it)
        ray.init(num_cpus=8, include_dashboard=True, object_store_memory=600 * 1024 * 1024, log_to_driver=False)
        _SHARED["running"] = True
    return ray


def release_shared_ray() -> None:
    """Shut the shared instance down (before a module starts Ray its own way)."""
    if _SHARED["running"]:
        import ray

        ray.shutdown()
        _SHARED["running"] = False


def tiny_data(data_root: Path, dst: Path) -> Path:
    """dst/{bottle,metal_plate}: 6 real training images and 4 test images (2 good, 2 defective, masks)."""
    if not (dst / "bottle").exists():
        mvtec_subset(data_root / "mvtec_ad" / "bottle", dst, 6, {"good": 2, "broken_large": 2})
        mvtec_subset(data_root / "mpdd" / "metal_plate", dst, 6, {"good": 2, "defect": 2})
    return dst


def corrupt_category(root: Path, name: str = "broken") -> Path:
    """A category whose training folder holds a truncated PNG (a clear error, not a crash)."""
    good = root / name / "train" / "good"
    good.mkdir(parents=True)
    src = next((root / "bottle" / "train" / "good").iterdir()).resolve()
    for i in range(3):
        (good / f"{i:03d}.png").write_bytes(src.read_bytes()[: 2000 if i == 1 else None])
    test = root / name / "test" / "good"
    test.mkdir(parents=True)
    (test / "000.png").write_bytes(src.read_bytes())
    return root


@pytest.fixture(scope="module")
def ray_local():
    """The shared instance (conftest shuts it down at the end of the session)."""
    yield start_ray()


@pytest.fixture(scope="module")
def tiny_root(data_root, tmp_path_factory) -> Path:
    return tiny_data(data_root, tmp_path_factory.mktemp("tiny"))


def images_equal(a, b) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a, b))


def kill_when(cmd: list[str], ready: Callable[[], bool], what: str, deadline_s: float = 900) -> None:
    """Run a job (``python -m jobs.X ...``) in a subprocess and SIGKILL it as soon as ``ready()``
    holds; fails if the job ends first or ``what`` never happens within ``deadline_s``."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen([sys.executable, "-m", *cmd], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if ready():
                return
            assert proc.poll() is None, f"{cmd[0]} ended before {what}"
            time.sleep(0.2)
        pytest.fail(f"{what} never happened")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
