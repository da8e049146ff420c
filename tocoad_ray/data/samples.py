"""Plain records describing a data set: which files, which label, which mask."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from ..errors import DataError  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Sample:
    """One image. ``label``: 0 normal, 1 anomalous. ``mask_path`` None means no pixel annotation
    (always for normal images; for anomalous ones it is scored as an empty mask)."""

    path: Path
    label: int
    mask_path: Path | None = None
    defect_type: str = "good"  # "good" for normal images


@dataclass
class Split:
    """Train (normal only) and test samples of one category."""

    name: str
    train: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)
