"""Operator feedback: images marked normal grow the memory bank of an artifact, without retraining.

:func:`add_normal_images` writes a NEW artifact version (``artifact_versions``); the version it
started from is kept and ``rollback`` restores it.

**Which patches join the bank.** Not all of them: an image's patches are mostly ordinary ones the
bank already covers, and adding them would only grow the bank (memory, search time). The bank is a
greedy k-center coreset (eq. 7), so its own resolution is the covering radius r of the fit: the
distance of the last centre greedy selection picked, which is the smallest distance between two
bank rows. Feedback continues that greedy selection over the new patches: while some new patch is
farther than r from the bank (plus the patches already taken), the farthest one is added. The new
images are then covered at the same radius as the training images were, with the fewest rows; r
is capped at half the threshold, so every added image scores well below it. A bank kept whole at
fit (``coreset_ratio: 1``) has r ≈ 0 and keeps every new patch, as it kept every training patch.

**Size cap.** When the bank would exceed ``bank.max_size`` rows (0: twice the bank the fit
selected), greedy coreset selection runs again over the union of bank and new rows, down to the
cap (``coreset.greedy_coreset``: far-away rows, such as a new kind of normal image, are the first
it keeps).

**Threshold.** The threshold is the ``threshold_quantile`` of leave-one-image-out normal scores;
the artifact holds those scores (``normal_scores``). Each added image gets the same kind of score:
against the new bank without its own rows (so it sees the other added images and the training
rows, as a training image saw the other training images). The new threshold is the quantile of
the stored scores plus these: the fit's estimator over the enlarged set of normal images. The
stored training scores are not recomputed (their patches are not kept); without a re-selection the
new bank contains the old one, so their held-out distances can only shrink and the stored values
are upper bounds. Since an image is refused above ``refuse_factor`` × threshold (unless forced),
one update moves the threshold by at most that factor; the version records the threshold before
and after. With ``threshold_mode: synthetic`` the synthetic threshold stays in force (its synthetic
anomalies were scored against the fit's bank) and only the recorded leave-one-out one moves.
Artifacts without stored scores use n scores rebuilt from their stored quantiles
(``drift.reference_scores``).
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..artifact import atomic_save_tensors, atomic_write_bytes, write_meta
from ..artifact_versions import artifact_lock, current_dir, current_version, write_version
from ..errors import ArtifactError, DataError

logger = logging.getLogger(__name__)

RADIUS_CAP = 0.5  # r ≤ this × threshold: an added image scores well below the threshold


class FeedbackRefused(DataError):
    """Images scored far above the threshold: probably not normal; ``force`` adds them anyway."""

    def __init__(self, message: str, refused: list[dict[str, Any]]):
        super().__init__(message)
        self.refused = refused


def _as_uploads(images: Sequence[str | Path | tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    out = []
    for im in images:
        if isinstance(im, tuple):
            out.append((str(im[0]), bytes(im[1])))
            continue
        p = Path(im)
        if not p.is_file():
            raise DataError(f"image file not found: {p}")
        out.append((p.name, p.read_bytes()))
    return out


def bank_radius(vectors: np.ndarray) -> float:
    """Smallest distance between two bank rows: for a greedy k-center coreset, the distance of its
    last pick, an upper bound of its covering radius."""
    import faiss

    if len(vectors) < 2:
        return 0.0
    d2, _ = faiss.knn(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(vectors, dtype=np.float32), 2)
    return float(np.sqrt(max(float(d2[:, 1].min()), 0.0)))


def cover(patches: np.ndarray, dist_to_bank: np.ndarray, radius: float) -> np.ndarray:
    """Greedy k-center continued over ``patches``: indices to add until every patch is within
    ``radius`` of the bank plus the added ones (farthest first)."""
    d = dist_to_bank.astype(np.float64).copy()
    x = patches.astype(np.float64)
    picked = []
    while len(d):
        j = int(d.argmax())
        if d[j] <= radius:
            break
        picked.append(j)
        d = np.minimum(d, np.linalg.norm(x - x[j], axis=1))
    return np.asarray(picked, dtype=np.int64)


def _score_stats(pool: np.ndarray, q: float, n_feedback: int) -> dict[str, Any]:
    return {"n": int(len(pool)), "mean": float(pool.mean()), "std": float(pool.std()), "min": float(pool.min()),
            "max": float(pool.max()), "q50": float(np.quantile(pool, 0.5)), "q95": float(np.quantile(pool, 0.95)),
            "q99": float(np.quantile(pool, 0.99)), "threshold_quantile": q, "n_feedback": n_feedback}


def add_normal_images(artifact: str | Path, images: Sequence[str | Path | tuple[str, bytes]], force: bool = False,
                      max_size: int | None = None, refuse_factor: float | None = None,
                      max_pixels: int | None = None) -> dict[str, Any]:
    """Add images an operator marked normal (paths, or (name, bytes) uploads) to the artifact's
    bank and make the result its current version. Returns what was done: the new version, each
    image's score before / after / held out, rows added, thresholds. Images already in the bank
    (same sha256) are skipped; if nothing is left to add, no version is written.

    Raises ``FeedbackRefused`` (nothing written) when an image scores above ``refuse_factor`` ×
    threshold and ``force`` is false; ``DataError`` for an unreadable image; ``ArtifactError``
    for an unreadable artifact. ``max_size`` / ``refuse_factor`` override the artifact's config."""
    import torch

    from ..bank.coreset import greedy_coreset
    from ..bank.memory_bank import MemoryBank, bank_tensors
    from ..bank.scoring import score_patches
    from ..config import replace
    from ..data.image_io import decode_image_bytes
    from ..drift import reference_scores
    from ..pipeline import load_detector

    root = Path(artifact)
    uploads = _as_uploads(images)
    if not uploads:
        raise DataError("no images given")
    with artifact_lock(root):
        parent = current_version(root)
        src_dir = current_dir(root)
        det = load_detector(src_dir, device="cpu")
        meta, cfg = det.meta, det.cfg
        bank_cfg = cfg.bank
        if max_size is not None:
            bank_cfg = replace(bank_cfg, max_size=int(max_size))
        if refuse_factor is not None:
            bank_cfg = replace(bank_cfg, refuse_factor=float(refuse_factor))
        cfg = replace(cfg, bank=bank_cfg)
        history = list(meta.get("feedback_images", []))
        known = {a["sha256"] for a in history}
        todo, skipped = [], []
        for name, data in uploads:
            sha = hashlib.sha256(data).hexdigest()
            if sha in known:
                skipped.append({"name": name, "sha256": sha, "reason": "already in the bank"})
                continue
            known.add(sha)
            try:
                rgb = decode_image_bytes(data, max_pixels)
            except DataError as e:
                raise DataError(f"{name}: {e}") from e
            todo.append((name, sha, det.preprocess.image(rgb)))
        if not todo:
            return {"version": parent, "previous_version": parent, "added": [], "skipped": skipped,
                    "bank_size": len(det.bank), "threshold": det.threshold, "previous_threshold": det.threshold,
                    "written": False}

        b = bank_cfg.num_neighbors
        x = torch.stack([t for _, _, t in todo])
        bs = max(1, bank_cfg.batch_size)
        parts = [det.model.embed(x[i:i + bs]) for i in range(0, len(x), bs)]
        rows = np.concatenate([p[0] for p in parts])
        P = parts[0][1][0] * parts[0][1][1]
        k = len(todo)
        thr = det.threshold
        before = det.bank.score(rows, k, b)[0]
        refused = [{"name": n, "score": float(s), "limit": bank_cfg.refuse_factor * thr}
                   for (n, _, _), s in zip(todo, before) if s > bank_cfg.refuse_factor * thr]
        if refused and not force:
            raise FeedbackRefused(
                "refused, these images score far above the threshold "
                f"({thr:.4g}; refuse_factor {bank_cfg.refuse_factor:g}): "
                + ", ".join(f"{r['name']} {r['score']:.4g}" for r in refused)
                + "; they look anomalous: check them, and add them with force only if they are normal", refused)

        old = det.bank.vectors(np.arange(len(det.bank))).astype(np.float32)
        radius = meta.get("bank_radius")
        radius = bank_radius(old) if radius is None else float(radius)
        r = min(radius, RADIUS_CAP * thr)
        d0 = det.bank.exact_search(rows, 1)[0][:, 0]
        picked = cover(rows, d0, r)
        next_id = max([int(meta.get("n_train_images", 0))] + [int(a["source_id"]) + 1 for a in history]
                      + [int(det.bank.source_image.max()) + 1])
        ids = next_id + np.arange(k, dtype=np.int32)
        union = np.concatenate([old, rows[picked]])
        src = np.concatenate([det.bank.source_image, ids[picked // P]]).astype(np.int32)
        fit_size = int(meta.get("fit_bank_size", meta["bank_size"]))
        cap = bank_cfg.max_size or 2 * fit_size
        reselected = len(union) > cap
        if reselected:
            sel = np.sort(greedy_coreset(union, cap, bank_cfg.projection_dim, cfg.seed, eps=bank_cfg.coreset_eps))
            union, src = union[sel], src[sel]
            logger.info("%s: bank of %d rows would pass max_size %d: coreset re-selected", root,
                        len(det.bank) + len(picked), cap)
        bank = MemoryBank(union, src)
        if meta.get("bank_format", "float32") == "sq8":
            bank = bank.quantized()
        after = bank.score(rows, k, b)[0]
        held_out = np.empty(k)
        for j in range(k):  # each added image against the new bank without its own rows
            keep = bank.source_image != ids[j]
            loo_bank = MemoryBank(bank.bank[keep], bank.source_image[keep], sq8=bank.sq8)
            held_out[j] = score_patches(loo_bank, rows[j * P:(j + 1) * P], 1, b)[0][0]

        q = bank_cfg.threshold_quantile
        pool = np.concatenate([reference_scores(meta), held_out])
        t_loo = float(np.quantile(pool, q))
        thresholds = dict(meta.get("thresholds") or {"active": "loo"})
        thresholds["loo"] = t_loo
        new_thr = t_loo if thresholds.get("active", "loo") == "loo" else float(meta["threshold"])
        rows_added = np.bincount((src[src >= next_id] - next_id), minlength=k) if k else np.zeros(0)
        added = [{"name": n, "sha256": sha, "source_id": int(ids[j]), "score_before": float(before[j]),
                  "score_after": float(after[j]), "held_out_score": float(held_out[j]),
                  "rows_added": int(rows_added[j]), "forced": bool(before[j] > bank_cfg.refuse_factor * thr)}
                 for j, (n, sha, _) in enumerate(todo)]
        created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        link = [f for f in meta.get("files", {}) if f != "bank.safetensors"]

        def write(tmp: Path, n: int) -> None:
            atomic_save_tensors(tmp / "bank.safetensors", bank_tensors(bank))
            atomic_write_bytes(tmp / "config.yaml", cfg.to_yaml().encode())
            new_meta = {
                **meta, "created": created, "config": cfg.to_dict(),
                "bank_size": len(bank), "bank_bytes": int(bank.bank.nbytes), "bank_radius": radius,
                "fit_bank_size": fit_size, "score_stats": _score_stats(pool, q, len(history) + k),
                "normal_scores": [float(v) for v in pool], "threshold": new_thr, "thresholds": thresholds,
                "feedback_images": history + [{**a, "version": n} for a in added],
                "feedback": {"version": n, "parent_version": parent, "added": added, "skipped": skipped,
                             "rows_added": int(len(picked)), "radius": r, "max_size": cap,
                             "reselected": bool(reselected), "threshold_before": thr, "threshold_after": new_thr},
                "files": {f: "" for f in link + ["bank.safetensors"]},
            }
            write_meta(tmp, new_meta)

        try:
            n = write_version(root, write, src_dir, link)
        except OSError as e:
            raise ArtifactError(f"cannot write a new version of {root}: {e}") from e
    logger.info("%s: version %d: %d image(s) added (%d bank rows), bank %d → %d, threshold %.4g → %.4g", root, n, k,
                len(picked), len(det.bank), len(bank), thr, new_thr)
    return {"version": n, "previous_version": parent, "added": added, "skipped": skipped,
            "refused_but_forced": [r["name"] for r in refused], "rows_added": int(len(picked)),
            "bank_size": len(bank), "previous_bank_size": len(det.bank), "reselected": bool(reselected),
            "threshold": new_thr, "previous_threshold": thr, "written": True}
