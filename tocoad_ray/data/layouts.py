"""Readers that turn a data set folder into a :class:`Split` (file lists only, no pixels read).

All readers return samples in a deterministic order (sorted by folder, then file name) and raise
:class:`DataError` naming the offending path. Training samples are always normal (label 0).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..names import LAYOUTS, did_you_mean
from .samples import DataError, Sample, Split

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})


def _is_image(p: Path) -> bool:
    # Skip hidden files: macOS archives carry "._name.png" AppleDouble files that are not images.
    return p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


def _images(folder: Path, recursive: bool = False) -> list[Path]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted((p for p in it if _is_image(p)), key=lambda p: p.relative_to(folder).as_posix())


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _category_dir(root: str | Path, category: str) -> Path:
    """``root/category``, or an error that lists the categories there (closest first)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root not found: {root}")
    base = root / category
    if not base.is_dir():
        there = [p.name for p in _subdirs(root) if not p.name.startswith("_")]
        raise DataError(f"category {category!r} not found under {root}{did_you_mean(category, there)}; "
                        f"categories there: {', '.join(there) or 'none'}")
    return base


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{what} not found: {path}")
    return path


def _mask_index(folder: Path) -> dict[str, Path]:
    """Map lower-cased file name -> path for the image files in ``folder`` (one listing, then O(1) lookups)."""
    if not folder.is_dir():
        return {}
    return {p.name.lower(): p for p in folder.iterdir() if _is_image(p)}


def _find_mask(index: dict[str, Path], stem: str, suffixes: tuple[str, ...]) -> Path | None:
    """First of ``<stem><suffix>.png`` (then the other image extensions) present in ``index``."""
    for exts in ((".png",), tuple(sorted(IMAGE_EXTS - {".png"}))):
        for suffix in suffixes:
            for ext in exts:
                hit = index.get(f"{stem}{suffix}{ext}".lower())
                if hit is not None:
                    return hit
    return None


def _train(paths: list[Path], folder: Path) -> list[Sample]:
    if not paths:
        raise DataError(f"no training images ({', '.join(sorted(IMAGE_EXTS))}) in {folder}")
    return [Sample(p, 0, None, "good") for p in paths]


def read_mvtec(root: str | Path, category: str) -> Split:
    """MVTec AD layout: ``root/category/train/good/*``, ``test/<type>/*`` (``good`` = normal),
    masks ``ground_truth/<type>/<stem>_mask.png`` (or ``<stem>.png``).

    An anomalous test image without a mask file gets ``mask_path=None`` and is later scored as an
    empty mask (it still counts for image-level metrics). Normal images never get masks.
    Also serves MPDD and Magnetic-tile, which ship in the same layout.
    """
    base = _category_dir(root, category)
    good = _require_dir(base / "train" / "good", "training folder")
    train = _train(_images(good), good)
    test_dir = _require_dir(base / "test", "test folder")
    test: list[Sample] = []
    for sub in _subdirs(test_dir):
        if sub.name == "good":
            test += [Sample(p, 0, None, "good") for p in _images(sub)]
            continue
        index = _mask_index(base / "ground_truth" / sub.name)
        test += [Sample(p, 1, _find_mask(index, p.stem, ("_mask", "")), sub.name) for p in _images(sub)]
    return Split(category, train, test)


def read_btad(root: str | Path, category: str) -> Split:
    """BTAD layout: ``root/category/train/ok``, ``test/ok``, ``test/ko``, masks
    ``ground_truth/ko/<stem>.png`` (or ``.bmp``). Anomalous images are typed ``"ko"``."""
    base = _category_dir(root, category)
    ok = _require_dir(base / "train" / "ok", "training folder")
    train = _train(_images(ok), ok)
    test_dir = _require_dir(base / "test", "test folder")
    test: list[Sample] = []
    if (test_dir / "ok").is_dir():
        test += [Sample(p, 0, None, "good") for p in _images(test_dir / "ok")]
    if (test_dir / "ko").is_dir():
        index = _mask_index(base / "ground_truth" / "ko")
        test += [Sample(p, 1, _find_mask(index, p.stem, ("", "_mask")), "ko") for p in _images(test_dir / "ko")]
    if not (test_dir / "ok").is_dir() and not (test_dir / "ko").is_dir():
        raise DataError(f"test folder {test_dir} has neither ok/ nor ko/")
    return Split(category, train, test)


def read_folder(root: str | Path, category: str) -> Split:
    """Generic layout for your own data::

        root/category/train/**        all normal (sub-folders allowed)
        root/category/test/good/*     normal
        root/category/test/<type>/*   anomalous, defect type = folder name
        root/category/masks/<stem>.png   optional mask (or <stem>_mask.png) for an anomalous image

    Masks are matched by file stem alone, so anomalous stems must be unique across types
    when ``masks/`` exists. The test folder is optional (fit-only data sets).
    """
    base = _category_dir(root, category)
    train_dir = _require_dir(base / "train", "training folder")
    train = _train(_images(train_dir, recursive=True), train_dir)
    test: list[Sample] = []
    test_dir = base / "test"
    if test_dir.is_dir():
        index = _mask_index(base / "masks")
        seen: dict[str, Path] = {}
        for sub in _subdirs(test_dir):
            for p in _images(sub):
                if sub.name == "good":
                    test.append(Sample(p, 0, None, "good"))
                    continue
                if index and p.stem in seen:
                    raise DataError(f"ambiguous mask for {p} and {seen[p.stem]}: same file stem; rename one")
                seen[p.stem] = p
                test.append(Sample(p, 1, _find_mask(index, p.stem, ("", "_mask")), sub.name))
    return Split(category, train, test)


def read_visa(root: str | Path, category: str, split_csv: str | Path | None = None) -> Split:
    """VisA layout driven by ``root/split_csv/1cls.csv`` (columns ``object,split,label,image,mask``;
    label ``normal``|``anomaly``; paths relative to ``root``). Anomalous images are typed ``"anomaly"``
    (VisA's CSV has no defect types)."""
    root = Path(root)
    csv_path = Path(split_csv) if split_csv is not None else root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise DataError(f"VisA split file not found: {csv_path}")
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        need = {"object", "split", "label", "image", "mask"}
        missing = need - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{csv_path}: missing column(s) {sorted(missing)}")
        rows = list(reader)
    objects = sorted({r["object"] for r in rows})
    mine = [r for r in rows if r["object"] == category]
    if not mine:
        raise DataError(f"{csv_path}: no rows for category {category!r}; available: {objects}")
    train: list[Sample] = []
    test: list[Sample] = []
    for line, r in enumerate(mine, start=2):
        label = {"normal": 0, "anomaly": 1}.get(r["label"].strip().lower())
        split = r["split"].strip().lower()
        if label is None or split not in ("train", "test"):
            raise DataError(f"{csv_path}: bad row for {r['image']!r}: split={r['split']!r} label={r['label']!r}")
        img = root / r["image"].strip()
        if not img.is_file():
            raise DataError(f"image file not found: {img} (listed in {csv_path})")
        mask = None
        if label == 1 and (r["mask"] or "").strip():
            mask = root / r["mask"].strip()
            if not mask.is_file():
                raise DataError(f"mask file not found: {mask} (listed in {csv_path})")
        if split == "train":
            if label:
                raise DataError(f"{csv_path}: anomalous image {img} in the train split; training must be normal")
            train.append(Sample(img, 0, None, "good"))
        else:
            test.append(Sample(img, label, mask, "anomaly" if label else "good"))
    if not train:
        raise DataError(f"{csv_path}: no training images for category {category!r}")
    key = lambda s: s.path.as_posix()  # noqa: E731
    return Split(category, sorted(train, key=key), sorted(test, key=key))


def read_elpv(root: str | Path | None = None, category: str = "mono", test_fraction: float = 0.2, seed: int = 0) -> Split:
    """ELPV solar cells from the installed ``elpv_dataset`` package (or ``root`` with the same
    ``labels.csv`` + ``images/``). ``category`` is the module type, ``mono`` or ``poly``.

    Normal = defect probability 0, anomalous = probability exactly 1; cells rated 1/3 or 2/3 are
    left out as ambiguous. Split: normal cells sorted by file name, then
    ``numpy.random.default_rng(seed).permutation`` picks ``round(test_fraction * n)`` of them for
    test and the rest train; every probability-1 cell of the type goes to test. No masks
    (image-level labels only), so pixel metrics do not apply.
    """
    if root is None:
        try:
            import elpv_dataset
        except ImportError as e:
            raise DataError("elpv layout needs the 'elpv-dataset' package (pip install elpv-dataset)") from e
        root = Path(elpv_dataset.__file__).parent / "data"
    root = Path(root)
    if category not in ("mono", "poly"):
        raise DataError(f"elpv category must be 'mono' or 'poly', got {category!r}")
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"elpv test_fraction must be in (0, 1), got {test_fraction}")
    labels = root / "labels.csv"
    if not labels.is_file():
        raise DataError(f"ELPV labels file not found: {labels}")
    normal: list[Path] = []
    defect: list[Path] = []
    for n, line in enumerate(labels.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3:
            raise DataError(f"{labels}:{n}: expected 'path probability type', got {line!r}")
        rel, prob_s, kind = parts
        try:
            prob = float(prob_s)
        except ValueError as e:
            raise DataError(f"{labels}:{n}: bad probability {prob_s!r}") from e
        if kind != category or prob not in (0.0, 1.0):
            continue
        (normal if prob == 0.0 else defect).append(root / rel)
    if not normal:
        raise DataError(f"{labels}: no normal (probability 0) cells of type {category!r}")
    for p in normal + defect:
        if not p.is_file():
            raise DataError(f"image file not found: {p} (listed in {labels})")
    normal.sort(key=lambda p: p.name)
    n_test = int(round(test_fraction * len(normal)))
    n_test = min(max(n_test, 1), len(normal) - 1)  # keep at least one image on each side
    picked = set(np.random.default_rng(seed).permutation(len(normal))[:n_test].tolist())
    train = [Sample(p, 0, None, "good") for i, p in enumerate(normal) if i not in picked]
    test = [Sample(p, 0, None, "good") for i, p in enumerate(normal) if i in picked]
    test += [Sample(p, 1, None, "defect") for p in sorted(defect, key=lambda p: p.name)]
    return Split(f"elpv_{category}", train, test)


def load_split(root: str | Path | None, category: str, layout: str = "mvtec") -> Split:
    """Read ``category`` under ``root`` with the reader for ``layout`` (mvtec|visa|btad|folder|elpv;
    for elpv ``root`` may be None = the installed package)."""
    if layout == "elpv":
        return read_elpv(None if root in (None, "", "-") else root, category)
    if layout not in LAYOUTS:
        raise DataError(f"unknown data layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    if root is None:
        raise DataError(f"layout {layout!r} needs a data root folder")
    reader = {"mvtec": read_mvtec, "visa": read_visa, "btad": read_btad, "folder": read_folder}[layout]
    return reader(root, category)


def list_categories(root: str | Path | None, layout: str) -> list[str]:
    """Every category under ``root`` in ``layout`` (elpv: mono, poly; VisA: the split file's objects)."""
    if layout == "elpv":
        return ["mono", "poly"]
    if root is None:
        raise DataError(f"layout {layout!r} needs a data root folder (--data ROOT)")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root not found: {root}")
    if layout == "visa":
        csv_path = root / "split_csv" / "1cls.csv"
        if not csv_path.is_file():
            raise DataError(f"VisA split file not found: {csv_path}")
        with open(csv_path, newline="") as f:
            return sorted({row["object"] for row in csv.DictReader(f)})
    cats = [p.name for p in _subdirs(root) if not p.name.startswith("_")]
    if not cats:
        raise DataError(f"no category folders under {root}")
    return cats
