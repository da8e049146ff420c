"""Small MVTec-layout trees of symlinks into the real data, for fast fit/evaluate runs."""
from __future__ import annotations

from pathlib import Path


def mvtec_subset(src: Path, dst: Path, n_train: int, test: dict[str, int], masks: bool = True,
                 category: str | None = None) -> Path:
    """Link every ⌈N/n⌉-th training image and the first ``test[type]`` test images of each defect type
    (with their ground-truth masks unless ``masks=False``) from the MVTec category ``src`` into
    ``dst/<category>``. Returns ``dst`` (the data root)."""
    cat = dst / (category or src.name)
    train = sorted((src / "train" / "good").glob("*.png"))
    step = max(1, len(train) // n_train)
    out = cat / "train" / "good"
    out.mkdir(parents=True)
    for p in train[::step][:n_train]:
        (out / p.name).symlink_to(p)
    for kind, n in test.items():
        out = cat / "test" / kind
        out.mkdir(parents=True)
        for p in sorted((src / "test" / kind).glob("*.png"))[:n]:
            (out / p.name).symlink_to(p)
            m = src / "ground_truth" / kind / f"{p.stem}_mask.png"
            if masks and kind != "good" and m.is_file():
                (cat / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
                (cat / "ground_truth" / kind / m.name).symlink_to(m)
    return dst
