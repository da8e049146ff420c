"""Score drift: a rolling window of image scores against the normal scores an artifact holds.

Two signals, each a test at significance ``alpha``:

* **shift**: the one-sided (upward) two-sample Kolmogorov-Smirnov statistic D+ = max_x
  F_ref(x) − F_window(x) between the window and the artifact's leave-one-image-out normal scores
  (``meta["normal_scores"]``): how far the window's scores sit *above* the normal ones, with its
  asymptotic p-value (Smirnov, Hodges' correction); ``ks_critical`` is the D+ at which it falls
  to ``alpha``. KS needs no binning (PSI would, and its bins are arbitrary with 64 reference
  scores). Upward only: leave-one-out scores sit above the scores of genuinely new normal images
  (their own bank rows are missing), so a two-sided test flags a healthy line (bottle, 20 good
  test images vs 20 leave-one-out scores: two-sided D 0.70, D+ 0.05), while the shifts that matter
  (lighting, focus: more false alarms, less margin) raise scores (darkened ×0.6: D+ 1.0; blur
  σ = 2 px: D+ 0.65). The two-sided D is reported as ``ks_two_sided``.
* **share above threshold**: the window's share of scores at or above the threshold in force,
  against the share the normal scores put there (smoothed: (k + ½)/(n + 1)); one-sided binomial
  tail p-value.

The alarm is raised when the window holds at least ``min_images`` scores and either p-value is
below ``alpha``. Artifacts written before the raw normal scores were stored carry only quantiles:
:func:`reference_scores` then rebuilds a sample from them (piecewise-linear CDF through min, q50,
q95, q99, max). Plain numpy: the service and offline tools share it.
"""
from __future__ import annotations

import math
import time
from collections import deque
from typing import Any

import numpy as np


def reference_scores(meta: dict[str, Any]) -> np.ndarray:
    """The artifact's normal scores: the stored leave-one-out scores, or (older artifacts) n
    scores spread evenly over the CDF the stored quantiles describe."""
    raw = meta.get("normal_scores")
    if raw:
        return np.asarray(raw, dtype=np.float64)
    s = meta.get("score_stats") or {}
    knots = [(0.0, s.get("min")), (0.5, s.get("q50")), (0.95, s.get("q95")), (0.99, s.get("q99")), (1.0, s.get("max"))]
    knots = [(p, float(v)) for p, v in knots if v is not None]
    if len(knots) < 2:
        raise ValueError("the artifact holds neither normal scores nor their quantiles")
    n = max(int(s.get("n", 0)), 2)
    p, v = np.array([k[0] for k in knots]), np.maximum.accumulate(np.array([k[1] for k in knots]))
    return np.interp((np.arange(n) + 0.5) / n, p, v)


def _cdfs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    x = np.concatenate([a, b])
    return np.searchsorted(a, x, side="right") / len(a), np.searchsorted(b, x, side="right") / len(b)


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample KS: max |F_a − F_b| over all points."""
    fa, fb = _cdfs(a, b)
    return float(np.abs(fa - fb).max())


def ks_upward(window: np.ndarray, reference: np.ndarray) -> float:
    """One-sided KS D+ = max (F_reference − F_window): > 0 where the window's scores run higher."""
    fw, fr = _cdfs(window, reference)
    return float(max(0.0, (fr - fw).max()))


def ks_pvalue(d: float, n: int, m: int) -> float:
    """Asymptotic P(D+ ≥ d) for samples of n and m: Smirnov's exp(−2z²), z = d·sqrt(nm/(n+m)),
    with Hodges' small-sample term (as scipy's ``ks_2samp(method="asymp")``)."""
    big, small = max(n, m), min(n, m)
    z = d * math.sqrt(n * m / (n + m))
    return float(min(1.0, math.exp(-2.0 * z * z - 2.0 * z * (big + 2 * small) / math.sqrt(big * small * (big + small)) / 3.0)))


def ks_critical(alpha: float, n: int, m: int) -> float:
    """The D+ at which ``ks_pvalue`` falls to ``alpha`` (bisection: the p-value falls with D+)."""
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if ks_pvalue(mid, n, m) <= alpha else (mid, hi)
    return hi


def binom_sf(k: int, m: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(m, p)."""
    if k <= 0:
        return 1.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    i = np.arange(k, m + 1)
    lg = np.array([math.lgamma(m + 1) - math.lgamma(j + 1) - math.lgamma(m - j + 1) for j in i])
    return float(min(1.0, np.exp(lg + i * math.log(p) + (m - i) * math.log1p(-p)).sum()))


def drift_stats(window: np.ndarray, reference: np.ndarray, threshold: float, alpha: float = 0.01,
                min_images: int = 30) -> dict[str, Any]:
    """Both signals for one window of scores (see the module docstring)."""
    w, ref = np.asarray(window, np.float64), np.asarray(reference, np.float64)
    n, m = len(ref), len(w)
    out: dict[str, Any] = {"images": m, "reference_images": n, "threshold": float(threshold), "alpha": alpha,
                           "min_images": min_images, "ks": None, "ks_pvalue": None, "ks_two_sided": None,
                           "ks_critical": ks_critical(alpha, n, m) if m and n else None,
                           "share_above": None, "share_expected": float((np.sum(ref >= threshold) + 0.5) / (n + 1)),
                           "share_pvalue": None, "alarm": False, "reasons": []}
    if m == 0 or n == 0:
        return out
    d = ks_upward(w, ref)
    k = int(np.sum(w >= threshold))
    out.update(ks=d, ks_pvalue=ks_pvalue(d, n, m), ks_two_sided=ks_statistic(w, ref), share_above=k / m,
               share_pvalue=binom_sf(k, m, out["share_expected"]))
    if m >= min_images:
        if out["ks_pvalue"] < alpha:
            out["reasons"].append("shift")
        if out["share_pvalue"] < alpha:
            out["reasons"].append("share_above")
        out["alarm"] = bool(out["reasons"])
    return out


class DriftWindow:
    """The last ``window`` scores of one product version, its statistics, and a short trend (one
    point every ``trend_every`` scores, the last ``trend_points`` kept). Bounded memory."""

    def __init__(self, reference: np.ndarray, threshold: float, window: int = 200, min_images: int = 30,
                 alpha: float = 0.01, trend_every: int = 10, trend_points: int = 60):
        self.reference = np.asarray(reference, np.float64)
        self.threshold = float(threshold)
        self.scores: deque[float] = deque(maxlen=window)
        self.min_images, self.alpha, self.trend_every = min_images, alpha, max(1, trend_every)
        self.trend: deque[list[float]] = deque(maxlen=trend_points)
        self.seen = 0
        self.since = time.time()
        self._stats: dict[str, Any] | None = None

    def add(self, scores) -> dict[str, Any]:
        """``push`` the scores, then the window's statistics."""
        self.push(scores)
        return self.stats()

    def push(self, scores) -> None:
        """Append scores (the statistics are computed at the trend points and when asked for)."""
        for s in np.atleast_1d(np.asarray(scores, np.float64)):
            self.scores.append(float(s))
            self.seen += 1
            if self.seen % self.trend_every == 0:
                st = self.stats(fresh=True)
                self.trend.append([round(time.time(), 3), st["ks"], st["share_above"], float(st["alarm"])])
        self._stats = None

    def stats(self, fresh: bool = False) -> dict[str, Any]:
        if fresh or self._stats is None:
            self._stats = drift_stats(np.fromiter(self.scores, np.float64), self.reference, self.threshold,
                                      self.alpha, self.min_images)
        return {**self._stats, "seen": self.seen, "since": self.since}
