"""fit / evaluate / predict on one machine, no Ray: the single-process reference every other path
(Ray jobs, the Serve application) must reproduce.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import __version__
from .artifact import (
    ArtifactError,
    atomic_save_tensors,
    atomic_write_bytes,
    load_tensors,
    read_meta,
    write_meta,
)
from .bank.memory_bank import MemoryBank, bank_from_tensors, bank_tensors
from .bank.scoring import anomaly_maps
from .config import Config, from_dict, replace
from .data import ImageDataset, Preprocess, Sample, has_masks, load_split, read_image
from .models.backbone import FeatureExtractor, resolve_device
from .patch_model import PatchModel, load_adapter

Log = Callable[[str], None]


logger = logging.getLogger(__name__)

def _loader(samples: Sequence[Sample], preprocess: Preprocess, cfg: Config, device: torch.device) -> DataLoader:
    return DataLoader(ImageDataset(samples, preprocess), batch_size=cfg.bank.batch_for(device), shuffle=False,
                      num_workers=cfg.data.num_workers)


def extract(model: PatchModel, loader: DataLoader, progress: bool = False, desc: str = "features"
            ) -> tuple[np.ndarray, tuple[int, int]]:
    """All patch rows of a loader's images, image-major."""
    from tqdm import tqdm

    out, grid = [], (0, 0)
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        rows, grid = model.embed(batch["image"])
        out.append(rows)
    return np.concatenate(out), grid


def _use_faiss_gpu(cfg: Config) -> bool:
    return cfg.bank.faiss_gpu and resolve_device(cfg.bank.device).type == "cuda"


def fit(cfg: Config, data_root: str | Path, category: str, out: str | Path, resume: bool = False,
        progress: bool = True, log: Log | None = None) -> dict[str, Any]:
    """Fit ``cfg.method`` on the normal training images and write an artifact to ``out``."""
    log = log or logger.info
    torch.manual_seed(cfg.seed)
    out = Path(out)
    split = load_split(data_root, category, cfg.data.layout)
    if not split.train:
        raise ValueError(f"no training images for {category!r} under {data_root}")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "config.yaml", cfg.to_yaml().encode())
    device = resolve_device(cfg.bank.device)
    timings: dict[str, float] = {}
    files: dict[str, str] = {}
    t0 = time.perf_counter()

    weights = cfg.backbone.weights
    if cfg.method == "tocoad":
        from .train.tocoad import train_tocoad

        sd = train_tocoad(cfg, [s.path for s in split.train], out / "train", device=str(device), resume=resume,
                          progress=progress, log=log)
        atomic_save_tensors(out / "backbone.safetensors", sd)
        files["backbone.safetensors"] = ""
        weights = str(out / "backbone.safetensors")
        timings["train_s"] = time.perf_counter() - t0
    extractor = FeatureExtractor(cfg.backbone.name, cfg.backbone.layers, weights)
    preprocess = Preprocess(cfg.data, extractor.mean, extractor.std)
    model = PatchModel(extractor, cfg.bank.patch_size, device=device, fast=cfg.backbone.fast_inference)

    t = time.perf_counter()
    patches, grid = extract(model, _loader(split.train, preprocess, cfg, model.device), progress, "train features")
    timings["features_s"] = time.perf_counter() - t
    return finish_fit(cfg, out, category, data_root, extractor, preprocess, patches, grid, len(split.train),
                      files=files, timings=timings, t_start=t0, device=device, resume=resume, progress=progress, log=log,
                      train_images=[s.path for s in split.train])


def finish_fit(cfg: Config, out: Path, category: str, data_root: str | Path, extractor: FeatureExtractor,
               preprocess: Preprocess, patches: np.ndarray, grid: tuple[int, int], n_train: int, *,
               files: dict[str, str], timings: dict[str, float], t_start: float, device: torch.device,
               resume: bool = False, progress: bool = True, log: Log | None = None,
               train_adapter: Callable[..., torch.nn.Module] | None = None,
               train_images: Sequence[str | Path] | None = None) -> dict[str, Any]:
    """Everything after the training features (image-major rows of F's patches): ReConPatch's g
    (method reconpatch), the coreset M (eq. 7), leave-one-image-out score statistics, threshold and
    the artifact. ``pipeline.fit`` and the Ray job both end here, so the same features give the
    same artifact. ``train_adapter`` replaces ``train_reconpatch`` (same signature), e.g. to run it
    as a Ray task. ``train_images`` (the files of the feature rows, in order) are needed by
    ``bank.threshold_mode: synthetic``."""
    log = log or logger.info
    out = Path(out)
    P = grid[0] * grid[1]
    if len(patches) != n_train * P:
        raise ValueError(f"{len(patches)} feature rows for {n_train} images of {P} patches each")
    source = np.repeat(np.arange(n_train, dtype=np.int32), P)
    if cfg.method == "reconpatch":
        from .train.reconpatch import train_reconpatch

        t = time.perf_counter()
        adapter = (train_adapter or train_reconpatch)(cfg, torch.from_numpy(patches), out / "train", device=str(device),
                                                      resume=resume, progress=progress, log=log)
        adapter.save(out / "adapter.safetensors")
        files["adapter.safetensors"] = ""
        with torch.inference_mode():
            patches = torch.cat([adapter(torch.from_numpy(c)) for c in np.array_split(patches, max(1, len(patches) // 65536))]).numpy()
        timings["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    log(f"coreset: selecting {cfg.bank.coreset_ratio:.3g} of {len(patches)} patches ({patches.shape[1]} dims)")
    bank = MemoryBank.build(patches, cfg.bank.coreset_ratio, cfg.bank.projection_dim, cfg.seed, source,
                            use_gpu=_use_faiss_gpu(cfg), progress=progress, eps=cfg.bank.coreset_eps, device=device)
    if cfg.bank.storage == "sq8":  # compact bank: statistics and threshold on the bank that will score
        bank = bank.quantized()
    timings["coreset_s"] = time.perf_counter() - t
    timings["bank_build_s"] = timings["features_s"] + timings["coreset_s"]

    # normal score statistics, leave-one-image-out, for a threshold that needs no anomalies
    t = time.perf_counter()
    n_stat = min(n_train, cfg.bank.threshold_images)
    ids = np.unique(np.linspace(0, n_train - 1, n_stat).round().astype(np.int64))
    rows = (ids[:, None] * P + np.arange(P)[None]).reshape(-1)
    normal = bank.leave_one_out_scores(patches[rows], ids.astype(np.int32), len(ids), cfg.bank.num_neighbors)
    timings["stats_s"] = time.perf_counter() - t
    q = cfg.bank.threshold_quantile
    stats = {
        "n": int(len(normal)), "mean": float(normal.mean()), "std": float(normal.std()),
        "min": float(normal.min()), "max": float(normal.max()),
        "q50": float(np.quantile(normal, 0.5)), "q95": float(np.quantile(normal, 0.95)),
        "q99": float(np.quantile(normal, 0.99)), "threshold_quantile": q,
    }
    threshold = float(np.quantile(normal, q))
    thresholds: dict[str, Any] = {"active": "loo", "loo": threshold}
    if cfg.bank.threshold_mode == "synthetic":
        t = time.perf_counter()
        thresholds = synthetic_thresholds(cfg, out, bank, extractor, preprocess, train_images, n_train, ids, normal,
                                          threshold, device, log)
        threshold = thresholds["synthetic"]
        timings["synthetic_threshold_s"] = time.perf_counter() - t

    atomic_save_tensors(out / "bank.safetensors", bank_tensors(bank))
    files["bank.safetensors"] = ""
    timings["fit_s"] = time.perf_counter() - t_start
    meta = {
        "version": __version__,
        "method": cfg.method,
        "category": category,
        "data_root": str(data_root),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": cfg.to_dict(),
        "backbone": {"name": extractor.name, "layers": extractor.layers, "weights_source": extractor.weights_source,
                     "weights_sha256": extractor.weights_sha256, "mean": extractor.mean, "std": extractor.std,
                     "fine_tuned": cfg.method == "tocoad"},
        "input_size": preprocess.size,
        "grid": list(grid),
        "feature_dim": int(bank.dim),
        "feature_normalization": "none",
        "bank_size": len(bank),
        "bank_format": cfg.bank.storage,
        "bank_bytes": int(bank.bank.nbytes),
        "n_train_images": n_train,
        "n_train_patches": int(len(patches)),
        "score_stats": stats,
        # the leave-one-out scores themselves: feedback recomputes the threshold from them, the
        # service's drift watch compares live scores with them (tocoad_ray.drift)
        "normal_scores": [float(v) for v in normal],
        "threshold": threshold,
        "thresholds": thresholds,
        "timings": timings,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "files": files,
    }
    write_meta(out, meta)
    log(f"artifact written to {out}: bank {len(bank)}×{bank.dim}, threshold {threshold:.4f}, "
        f"bank build {timings['bank_build_s']:.1f}s (features {timings['features_s']:.1f}s + coreset {timings['coreset_s']:.1f}s)")
    return meta


def synthetic_thresholds(cfg: Config, out: Path, bank: MemoryBank, extractor: FeatureExtractor, preprocess: Preprocess,
                         images: Sequence[str | Path] | None, n_train: int, ids: np.ndarray, normal: np.ndarray,
                         loo: float, device: torch.device, log: Log) -> dict[str, Any]:
    """``bank.threshold_mode: synthetic``: the generator's anomalies made from the images whose
    leave-one-image-out scores are ``normal`` (``validation.build_validation_set``), scored the same
    way (their own bank rows left out, so both sides are held-out-like), set the threshold that
    reaches ``bank.threshold_recall`` on them with at most ``bank.threshold_max_fpr`` false alarms
    on the normals (``bank/threshold.py``). Returns the artifact's ``thresholds`` record."""
    from .bank.threshold import synthetic_threshold
    from .validation import build_validation_set

    if images is None or len(images) != n_train:
        raise ValueError(f"bank.threshold_mode synthetic needs the {n_train} training image files, "
                         f"got {'none' if images is None else len(images)}")
    kind = cfg.bank.threshold_generator or cfg.generator.kind
    vset = build_validation_set([images[i] for i in ids], preprocess, kind, cfg.seed)
    adapter = load_adapter(out / "adapter.safetensors") if (out / "adapter.safetensors").is_file() else None
    model = PatchModel(extractor, cfg.bank.patch_size, adapter=adapter, device=device, fast=cfg.backbone.fast_inference)
    x = vset.images[torch.from_numpy(vset.labels == 1)]
    bs = cfg.bank.batch_for(model.device)
    rows = np.concatenate([model.embed(x[i:i + bs])[0] for i in range(0, len(x), bs)])
    anomalous = bank.leave_one_out_scores(rows, ids.astype(np.int32), len(ids), cfg.bank.num_neighbors)
    s = synthetic_threshold(normal, anomalous, cfg.bank.threshold_recall, cfg.bank.threshold_max_fpr)
    log(f"threshold: synthetic {s.threshold:.4f} ({s.bound} bound: recall {s.recall:.3f} on {len(anomalous)} {kind} "
        f"anomalies, false alarms {s.fpr:.3f} on {len(normal)} normals), leave-one-out quantile {loo:.4f}")
    return {"active": "synthetic", "loo": loo, "synthetic": s.threshold,
            "synthetic_fit": {**s.to_dict(), "generator": kind, "normal_scores": [float(v) for v in normal],
                              "anomalous_scores": [float(v) for v in anomalous]}}


@dataclass
class Detector:
    """A loaded artifact: scores preprocessed image batches."""

    meta: dict[str, Any]
    cfg: Config
    model: PatchModel
    bank: MemoryBank
    preprocess: Preprocess

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    def score(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """[B, 3, S, S] → image scores [B] (eq. 9), anomaly maps [B, S, S] (blurred s')."""
        rows, (h, w) = self.model.embed(images)
        b = images.shape[0]
        scores, s_prime = self.bank.score(rows, b, self.cfg.bank.num_neighbors)
        maps = anomaly_maps(s_prime.reshape(b, h, w), images.shape[-1], self.cfg.bank.blur_sigma)
        return scores, maps


def load_detector(artifact: str | Path, device: str | None = None, search: str | None = None) -> Detector:
    """Load and verify an artifact; rebuild F (+ g) and check the weights are the ones the bank was
    built with. ``search`` overrides the artifact's ``bank.search`` (exact | ivf). A versioned
    artifact folder loads its current version (``artifact_versions``)."""
    from .artifact_versions import current_dir

    artifact = current_dir(artifact)
    meta = read_meta(artifact)
    cfg = from_dict(Config, meta["config"])
    if search is not None:
        cfg = replace(cfg, bank=replace(cfg.bank, search=search))
    bb = meta["backbone"]
    weights = str(artifact / "backbone.safetensors") if bb.get("fine_tuned") else cfg.backbone.weights
    # weights=random: fit seeded torch with cfg.seed right before building F, so the same seed
    # rebuilds the same random network (without touching the caller's RNG state)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        extractor = FeatureExtractor(bb["name"], bb["layers"], weights)
    if extractor.weights_sha256 != bb["weights_sha256"]:
        raise ArtifactError(
            f"{artifact}: the bank was built with backbone {bb['name']} weights sha256 {bb['weights_sha256'][:12]}… "
            f"({bb['weights_source']}), but the weights found now ({extractor.weights_source}) have sha256 "
            f"{extractor.weights_sha256[:12]}…; refit the bank or supply the original weights")
    adapter = load_adapter(artifact / "adapter.safetensors") if (artifact / "adapter.safetensors").is_file() else None
    tensors = load_tensors(artifact / "bank.safetensors")
    dev = resolve_device(device or cfg.bank.device)
    try:
        bank = bank_from_tensors(tensors, meta.get("bank_format", "float32"), int(meta["feature_dim"]),
                                 str(artifact / "bank.safetensors"),
                                 use_gpu=cfg.bank.faiss_gpu and dev.type == "cuda", search=cfg.bank.search,
                                 nlist=cfg.bank.ivf_nlist, nprobe=cfg.bank.ivf_nprobe)
    except ValueError as e:
        raise ArtifactError(str(e)) from e
    model = PatchModel(extractor, cfg.bank.patch_size, adapter=adapter, device=dev, fast=cfg.backbone.fast_inference)
    return Detector(meta, cfg, model, bank, Preprocess(cfg.data, extractor.mean, extractor.std))


def evaluate(artifact: str | Path, data_root: str | Path, category: str, layout: str | None = None,
             progress: bool = True, return_arrays: bool = False, search: str | None = None) -> dict[str, Any]:
    """Score the test split; image/pixel AUROC, AUPRO, F1-max, timing. Pixel metrics None without masks."""
    from .metrics import evaluate_scores

    det = load_detector(artifact, search=search)
    split = load_split(data_root, category, layout or det.cfg.data.layout)
    if not split.test:
        raise ValueError(f"no test images for {category!r} under {data_root}")
    loader = _loader(split.test, det.preprocess, det.cfg, det.model.device)
    labels, scores, maps, masks = [], [], [], []
    with_masks = has_masks(split.test)
    from tqdm import tqdm

    # warm-up so the first batch's one-off costs don't count against ms/image
    first = next(iter(loader))
    det.score(first["image"][:1])
    seconds = 0.0
    for batch in tqdm(loader, desc="test", unit="batch", disable=not progress):
        t = time.perf_counter()
        s, m = det.score(batch["image"])
        seconds += time.perf_counter() - t
        labels.append(batch["label"].numpy())
        scores.append(s)
        if with_masks:
            maps.append(m.astype(np.float32))
            masks.append(batch["mask"][:, 0].numpy() > 0.5)
    labels_a = np.concatenate(labels)
    scores_a = np.concatenate(scores)
    maps_a = np.concatenate(maps) if with_masks else None
    masks_a = np.concatenate(masks) if with_masks else None
    res = evaluate_scores(labels_a, scores_a, masks_a, maps_a)
    thr = det.threshold
    pred = scores_a >= thr
    res.update({
        "n_test": int(len(labels_a)),
        "n_anomalous": int(labels_a.sum()),
        "ms_per_image": 1000.0 * seconds / len(labels_a),
        "threshold": thr,
        "threshold_tpr": float(pred[labels_a == 1].mean()) if labels_a.any() else None,
        "threshold_fpr": float(pred[labels_a == 0].mean()) if (labels_a == 0).any() else None,
        "method": det.meta["method"],
        "backbone": det.meta["backbone"]["name"],
        "input_size": det.meta["input_size"],
        "bank_size": det.meta["bank_size"],
        "bank_build_s": det.meta["timings"].get("bank_build_s"),
        "fit_s": det.meta["timings"].get("fit_s"),
    })
    if return_arrays:
        res["_arrays"] = {"labels": labels_a, "scores": scores_a, "maps": maps_a, "masks": masks_a}
    return res


def predict(artifact: str | Path, images: Sequence[str | Path], out_dir: str | Path, threshold: float | None = None
            ) -> list[dict[str, Any]]:
    """Score image files; write a heatmap overlay PNG per image and ``predictions.json`` to ``out_dir``."""
    from .visualize import heatmap_overlay, save_png

    det = load_detector(artifact)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    thr = det.threshold if threshold is None else float(threshold)
    results = []
    used: set[Path] = set()
    for path in images:
        path = Path(path)
        rgb = read_image(path)
        x = det.preprocess.image(rgb)[None]
        s, m = det.score(x)
        shown = det.preprocess.denormalize(x)
        overlay = heatmap_overlay(shown, m[0], det.meta["score_stats"], thr)
        png = out_dir / f"{path.stem}_heatmap.png"
        if png in used:  # same file name from different folders: keep both
            png = out_dir / f"{path.parent.name}_{path.stem}_{len(used)}_heatmap.png"
        used.add(png)
        save_png(png, overlay)
        results.append({"image": str(path), "score": float(s[0]), "threshold": thr, "anomalous": bool(s[0] >= thr),
                        "heatmap": str(png)})
    atomic_write_bytes(out_dir / "predictions.json", json.dumps(results, indent=2).encode())
    return results
