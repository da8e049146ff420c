"""Evaluation metrics for visual anomaly detection (plain numpy/scipy).

Exact, sort-based implementations: no threshold grids and no O(N^2) memory, so
pixel-level metrics over a whole MVTec category (~300 images x 224 x 224, about
15M pixels) take a few hundred MB at most.

* :func:`image_auroc`  - ROC AUC, ties counted 1/2 (identical to sklearn's roc_auc_score).
* :func:`pixel_auroc`  - the same over all pixels of all images.
* :func:`aupro`        - normalised area under the per-region-overlap curve up to
  ``fpr_limit`` (MVTec AD, Bergmann et al.), computed like the reference ``compute_pro``.
* :func:`f1_max`       - best F1 over all thresholds and the threshold reaching it.
* :func:`evaluate_scores` - all of the above as a dict of plain floats.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = ["image_auroc", "pixel_auroc", "aupro", "f1_max", "evaluate_scores"]

# Only floating-point rounding may push a normalised area past [0, 1]; anything
# bigger than this is a bug and trips the assertion instead of being clipped.
_ROUNDING_TOL = 1e-9


def _as_binary(labels, name: str) -> np.ndarray:
    a = np.asarray(labels)
    if a.dtype == bool:
        return a
    if a.size and not np.isin(a, (0, 1)).all():
        raise ValueError(f"{name} must be binary (bool or 0/1), got values {np.unique(a)[:5]}")
    return a.astype(bool)


def _as_scores(scores, name: str) -> np.ndarray:
    s = np.asarray(scores)
    if not np.issubdtype(s.dtype, np.floating):
        # ints/bools: float64 is exact for them; floats keep their dtype so that
        # float32 maps are neither copied to float64 nor re-tied by a downcast.
        s = s.astype(np.float64)
    if not np.isfinite(s).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return s


def _pos_neg(labels, scores, what: str) -> tuple[np.ndarray, np.ndarray]:
    y = _as_binary(labels, f"{what} labels")
    s = _as_scores(scores, f"{what} scores")
    if y.shape != s.shape:
        raise ValueError(f"{what}: labels shape {y.shape} != scores shape {s.shape}")
    # Boolean indexing copies, which we need anyway because we sort in place.
    return s[y].ravel(), s[~y].ravel()


def _auc_from_pos_neg(pos: np.ndarray, neg: np.ndarray, what: str) -> float:
    """Mann-Whitney U / (n_pos * n_neg) with ties counted 1/2.

    That is exactly the trapezoidal area under the ROC curve that sklearn
    computes (a tie block is a diagonal ROC segment, whose area is half the box).
    Memory: the sorted negatives plus two int64 arrays the size of ``pos``.
    """
    if pos.size == 0 or neg.size == 0:
        raise ValueError(
            f"{what} AUROC is undefined: only one class present "
            f"({pos.size} positive, {neg.size} negative samples)"
        )
    neg.sort()
    less = np.searchsorted(neg, pos, side="left")  # negatives strictly below each positive
    leq = np.searchsorted(neg, pos, side="right")  # ... below or tied
    # 2*less + ties = less + leq; integer sums are exact, Python int division rounds once.
    twice_u = int(less.sum(dtype=np.int64)) + int(leq.sum(dtype=np.int64))
    return twice_u / (2 * int(pos.size) * int(neg.size))


def image_auroc(labels, scores) -> float:
    """ROC AUC of image ``scores`` against binary ``labels`` (1 = anomalous).

    Ties are handled like ``sklearn.metrics.roc_auc_score``. Raises ValueError
    if only one class is present.
    """
    pos, neg = _pos_neg(labels, scores, "image")
    return _auc_from_pos_neg(pos, neg, "image")


def pixel_auroc(masks, maps) -> float:
    """ROC AUC over all pixels: ``masks`` bool (N, H, W), ``maps`` float (N, H, W)."""
    pos, neg = _pos_neg(masks, maps, "pixel")
    return _auc_from_pos_neg(pos, neg, "pixel")


def f1_max(labels, scores) -> tuple[float, float]:
    """Best F1 over all thresholds, as ``(f1, threshold)``; predicted positive means ``score >= threshold``.

    Works on image labels/scores or on pixel masks/maps (any matching shapes).
    Among thresholds with equal F1 the highest one is returned. Raises
    ValueError when there are no positives (F1 is then undefined).
    """
    pos, neg = _pos_neg(labels, scores, "f1")
    if pos.size == 0:
        raise ValueError("f1_max is undefined without positive samples")
    pos.sort()
    neg.sort()
    # The optimum is always at a positive score: raising the threshold from
    # anywhere up to the next positive score only drops false positives.
    cand = np.unique(pos)
    tp = pos.size - np.searchsorted(pos, cand, side="left")
    fp = neg.size - np.searchsorted(neg, cand, side="left")
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (TP + FP + P); denominator > 0 since P > 0.
    f1 = 2.0 * tp / (tp + fp + pos.size)
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))  # last max = highest threshold
    return float(f1[best]), float(cand[best])


def _pro_curve(masks: np.ndarray, maps: np.ndarray, num_thresholds: int | None):
    """(fpr, pro) points for decreasing thresholds, starting at (0, 0); None if no regions.

    Same curve as MVTec's ``compute_pro`` (every normal pixel adds 1 to the FP
    count, every pixel of a region of size |R| adds 1/|R| to the PRO sum,
    pixels visited by decreasing score, one point per distinct score), but
    without sorting all pixels together: between two consecutive distinct
    *anomalous* scores t_prev > t only normal pixels enter, so the curve there
    is horizontal and its trapezoid area is fixed by two points,
    (FP(> t), PRO(t_prev)) and (FP(>= t), PRO(t)). FP counts come from
    searchsorted on the sorted normal scores. Memory: one sorted copy of the
    normal scores plus arrays the size of the anomalous pixels.
    """
    structure = np.ones((3, 3), dtype=int)  # 8-connectivity, as in the MVTec reference
    a_scores, a_weights = [], []
    n_regions = 0
    for i in range(masks.shape[0]):
        # Label per image: regions never connect across images.
        lab, n = ndimage.label(masks[i], structure=structure)
        if n:
            inside = lab > 0
            ids = lab[inside]
            sizes = np.bincount(ids, minlength=n + 1)
            a_scores.append(maps[i][inside])
            a_weights.append(1.0 / sizes[ids])
        n_regions += n
    if n_regions == 0:
        return None
    normal = maps[~masks]  # copy, sorted in place below
    n_normal = normal.size
    if n_normal == 0:
        raise ValueError("aupro: no normal (mask == 0) pixels, the FPR is undefined")
    normal.sort()
    a_scores = np.concatenate(a_scores)
    a_weights = np.concatenate(a_weights)
    order = np.argsort(a_scores)[::-1]  # decreasing; order within ties is irrelevant
    a_scores = a_scores[order]
    pro_cum = np.cumsum(a_weights[order])
    # Normalise by the total weight actually summed (= n_regions up to rounding)
    # so the final PRO is exactly 1 rather than 1 +- eps.
    pro_cum /= pro_cum[-1]

    def n_normal_at_or_above(t):
        return n_normal - np.searchsorted(normal, t, side="left")

    if num_thresholds is None:
        # Last index of each block of tied anomalous scores: one point per threshold.
        ends = np.flatnonzero(a_scores[1:] != a_scores[:-1])
        ends = np.append(ends, a_scores.size - 1)
        thr = a_scores[ends]
        pro_at = pro_cum[ends]
        pro_before = np.concatenate(([0.0], pro_at[:-1]))
        fp_above = n_normal - np.searchsorted(normal, thr, side="right")  # strictly above
        fp_at = n_normal_at_or_above(thr)
        fp = np.stack([fp_above, fp_at], axis=1).ravel()
        pro = np.stack([pro_before, pro_at], axis=1).ravel()
    else:
        # Optional coarse approximation: evenly spaced thresholds over the score range.
        lo = min(normal[0], a_scores[-1])
        hi = max(normal[-1], a_scores[0])
        thr = np.linspace(hi, lo, int(num_thresholds))
        asc = a_scores[::-1]
        n_a_above = asc.size - np.searchsorted(asc, thr, side="left")
        pro = np.where(n_a_above > 0, pro_cum[np.maximum(n_a_above - 1, 0)], 0.0)
        fp = n_normal_at_or_above(thr)
    # Start at (0, 0); after the lowest anomalous score only normal pixels remain,
    # a horizontal run to (1, 1).
    fpr = np.concatenate(([0.0], fp / n_normal, [1.0]))
    pro = np.concatenate(([0.0], pro, [1.0]))
    return fpr, pro


def _trapezoid_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under (x, y) for x in [0, x_max], x non-decreasing, y linearly
    interpolated at x_max (MVTec ``trapezoid`` with ``x_max``)."""
    k = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
    xs, ys = x[:k], y[:k]
    area = float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)))
    if k < x.size and xs[-1] < x_max:
        # Partial segment [x[k-1], x_max]; x[k] > x_max > x[k-1] so no division by 0.
        x0, x1, y0, y1 = x[k - 1], x[k], y[k - 1], y[k]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at) * (x_max - x0)
    return area


def aupro(masks, maps, fpr_limit: float = 0.3, num_thresholds: int | None = None) -> float:
    """Normalised area under the PRO curve for FPR in [0, fpr_limit], in [0, 1].

    ``masks`` bool (N, H, W) ground truth, ``maps`` float (N, H, W) anomaly maps.
    Regions are 8-connected components of each image's mask; PRO at a threshold
    is the mean over *all regions of all images* of the fraction of the region
    above the threshold (each region weighs the same whatever its size), and
    the FPR is taken over all normal pixels, good images included. The curve
    is exact (one point per distinct score, ``num_thresholds=None``) or read at
    ``num_thresholds`` evenly spaced thresholds; it is integrated with the
    trapezoid rule, interpolated at ``fpr_limit`` and divided by ``fpr_limit``.

    Returns ``nan`` when the masks contain no anomalous region.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if num_thresholds is not None and int(num_thresholds) < 2:
        raise ValueError(f"num_thresholds must be >= 2 or None, got {num_thresholds}")
    m = _as_binary(masks, "masks")
    a = _as_scores(maps, "maps")
    if m.ndim == 2:
        m, a = m[None], a[None]
    if m.shape != a.shape or m.ndim != 3:
        raise ValueError(f"aupro: masks {m.shape} and maps {a.shape} must both be (N, H, W)")
    curve = _pro_curve(m, a, num_thresholds)
    if curve is None:
        return math.nan
    fpr, pro = curve
    result = _trapezoid_up_to(fpr, pro, float(fpr_limit)) / fpr_limit
    # Published tools returned values > 1 (no normalisation / extrapolation);
    # here anything beyond rounding noise is a bug.
    assert -_ROUNDING_TOL <= result <= 1.0 + _ROUNDING_TOL, f"AUPRO out of [0, 1]: {result}"
    # Absorb only that rounding noise (< 1e-9) so the documented range holds.
    return min(max(result, 0.0), 1.0)


def evaluate_scores(labels, image_scores, masks=None, maps=None) -> dict:
    """All metrics as plain floats.

    Keys: ``image_auroc, pixel_auroc, aupro, f1_max, f1_threshold`` (F1 at image
    level). Pixel metrics are None when ``masks`` is None or has no positive
    pixel (then ``maps`` is ignored). Image metrics raise ValueError if
    ``labels`` holds a single class.
    """
    f1, thr = f1_max(labels, image_scores)
    out = {
        "image_auroc": float(image_auroc(labels, image_scores)),
        "pixel_auroc": None,
        "aupro": None,
        "f1_max": float(f1),
        "f1_threshold": float(thr),
    }
    if masks is not None:
        m = _as_binary(masks, "masks")
        if m.any():
            if maps is None:
                raise ValueError("masks with anomalous pixels given but no anomaly maps")
            out["pixel_auroc"] = float(pixel_auroc(m, maps))
            out["aupro"] = float(aupro(m, maps))
    return out
