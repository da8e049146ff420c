"""Verdict thresholds from image scores (plain numpy).

Two ways to set the image-score threshold above which an image is called anomalous:

- ``quantile_threshold``: a quantile of normal scores (the leave-one-image-out scores of training
  images), which bounds the false-alarm rate and knows nothing about defects;
- ``synthetic_threshold``: the highest threshold that still flags ``target_recall`` of synthetic
  anomalies (G's), raised where needed so that at most ``max_fpr`` of the normal scores reach it.
  When both cannot hold, the false-alarm bound wins and the recall reached is reported.

An image is anomalous when ``score >= threshold`` (as ``pipeline.evaluate`` and the service count).
Thresholds that sit just above a score are the next float32 up, so they survive a float32 round
trip (exported models and the service compare in float32).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


def _scores(x: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{what}: no scores")
    if not np.isfinite(a).all():
        raise ValueError(f"{what}: {int((~np.isfinite(a)).sum())} scores are not finite")
    return a


def _above(x: float) -> float:
    """The smallest float32 strictly greater than ``x``."""
    return float(np.nextafter(np.float32(x), np.float32(np.inf)))


def quantile_threshold(normal: np.ndarray, q: float) -> float:
    """The ``q`` quantile of normal scores (linear interpolation, as ``np.quantile``)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {q}")
    return float(np.quantile(_scores(normal, "normal scores"), q))


def recall_threshold(anomalous: np.ndarray, target_recall: float) -> float:
    """The highest threshold at which at least ``target_recall`` of ``anomalous`` score >= it."""
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target recall must be in (0, 1], got {target_recall}")
    a = np.sort(_scores(anomalous, "anomalous scores"))[::-1]
    k = max(1, math.ceil(target_recall * len(a) - 1e-9))  # scores that must be flagged
    return float(a[k - 1])


def fpr_threshold(normal: np.ndarray, max_fpr: float) -> float:
    """The lowest threshold at which at most ``max_fpr`` of ``normal`` score >= it."""
    if not 0.0 <= max_fpr < 1.0:
        raise ValueError(f"false-alarm bound must be in [0, 1), got {max_fpr}")
    n = np.sort(_scores(normal, "normal scores"))[::-1]
    m = math.floor(max_fpr * len(n) + 1e-9)  # false alarms allowed
    return _above(n[m])  # strictly above the (m+1)-th highest normal score


def rates(normal: np.ndarray, anomalous: np.ndarray, threshold: float) -> dict[str, float]:
    """Recall (TPR) on anomalous scores, false-alarm rate (FPR) on normal ones, precision and F1."""
    n, a = _scores(normal, "normal scores"), _scores(anomalous, "anomalous scores")
    tp, fp = int((a >= threshold).sum()), int((n >= threshold).sum())
    tpr, fpr = tp / len(a), fp / len(n)
    precision = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * precision * tpr / (precision + tpr) if precision + tpr else 0.0
    return {"tpr": tpr, "fpr": fpr, "precision": precision, "f1": f1}


@dataclass
class SyntheticThreshold:
    """The chosen threshold and what it reaches on the scores it was set from."""

    threshold: float
    bound: str  # "recall": the recall target set it; "fpr": the false-alarm bound raised it
    target_recall: float
    max_fpr: float
    recall: float  # on the synthetic anomalies
    fpr: float  # on the normal scores
    recall_threshold: float
    fpr_threshold: float
    n_normal: int
    n_anomalous: int

    def to_dict(self) -> dict:
        return asdict(self)


def synthetic_threshold(normal: np.ndarray, anomalous: np.ndarray, target_recall: float = 0.9,
                        max_fpr: float = 0.05) -> SyntheticThreshold:
    """Reach ``target_recall`` on synthetic anomalies with as few false alarms as possible, never
    more than ``max_fpr`` of the normals: max(recall threshold, false-alarm threshold)."""
    n, a = _scores(normal, "normal scores"), _scores(anomalous, "anomalous scores")
    t_rec, t_fpr = recall_threshold(a, target_recall), fpr_threshold(n, max_fpr)
    t = max(t_rec, t_fpr)
    r = rates(n, a, t)
    return SyntheticThreshold(threshold=t, bound="recall" if t_rec >= t_fpr else "fpr", target_recall=target_recall,
                              max_fpr=max_fpr, recall=r["tpr"], fpr=r["fpr"], recall_threshold=t_rec,
                              fpr_threshold=t_fpr, n_normal=len(n), n_anomalous=len(a))
