"""Shared fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# as `tocoad` does for a local instance (distributed/session.py): Ray Train polls its workers every
# 0.25 s instead of 2 s, so each stage starts and ends seconds sooner
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# and without the per-run PreemptionWatcher actor (one more process per run; no spot nodes here)
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Real data folder: $TOCOAD_DATA, else ``shared/data`` beside the repository; skip if absent."""
    env = os.environ.get("TOCOAD_DATA")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (set TOCOAD_DATA)")
    return root


@pytest.fixture(scope="session", autouse=True)
def _shared_ray_shutdown():
    """The Ray instance the training modules share (tests/ray_fixtures.py) ends with the session."""
    yield
    from .ray_fixtures import release_shared_ray

    release_shared_ray()
