"""Shared fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Real data folder: $TOCOAD_DATA, else ``shared/data`` beside the repository; skip if absent."""
    env = os.environ.get("TOCOAD_DATA")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (set TOCOAD_DATA)")
    return root
