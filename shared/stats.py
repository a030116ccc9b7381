"""Statistical comparison of two screening models on the same patients: DeLong's test.

Two AUCs measured on the same test patients are correlated; comparing their confidence
intervals as if independent is wrong. DeLong, DeLong & Clarke-Pearson (1988) estimate the
covariance of the two AUCs from the structural components of the Mann-Whitney statistic; the
fast version (Sun & Xu 2014) gets them from midranks. Written here because neither sklearn nor
scipy has it and the packages that do (MLstatkit, rocauc-comparison) are small single-author
projects outside our stack; ``tests/test_stats.py`` checks it against a paired bootstrap.

Only for researcher-side evaluation (simulation, pooled baseline): it needs per-patient
scores, which never leave a site in a real federation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm, rankdata


@dataclass(frozen=True)
class DeLongResult:
    auc_a: float
    auc_b: float
    diff: float  # auc_a - auc_b
    se: float  # standard error of the difference
    z: float
    p: float  # two-sided
    n_pos: int
    n_neg: int

    def ci(self, level: float = 0.95) -> tuple[float, float]:
        """Confidence interval of ``diff``."""
        h = norm.ppf(0.5 + level / 2) * self.se
        return self.diff - h, self.diff + h


def _components(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs [k] and the structural components V10 [k, m] (positives), V01 [k, n] (negatives)."""
    pos, neg = scores[:, labels == 1], scores[:, labels == 0]
    m, n = pos.shape[1], neg.shape[1]
    tx = np.apply_along_axis(rankdata, 1, pos)
    ty = np.apply_along_axis(rankdata, 1, neg)
    tz = np.apply_along_axis(rankdata, 1, np.concatenate([pos, neg], axis=1))
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - tx) / n  # per positive: share of negatives it outranks (ties 1/2)
    v01 = 1.0 - (tz[:, m:] - ty) / m  # per negative: share of positives that outrank it
    return aucs, v10, v01


def delong_test(labels, scores_a, scores_b) -> DeLongResult:
    """DeLong's test of AUC(scores_a) == AUC(scores_b) on the same patients (binary labels 0/1)."""
    y = np.asarray(labels).astype(int)
    a, b = np.asarray(scores_a, dtype=np.float64).ravel(), np.asarray(scores_b, dtype=np.float64).ravel()
    if not y.size == a.size == b.size:
        raise ValueError(f"{y.size} labels, {a.size} and {b.size} scores: both models must be scored on the same patients")
    s = np.vstack([a, b])
    m, n = int((y == 1).sum()), int((y == 0).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong's test needs at least 2 positives and 2 negatives, got {m} and {n}")
    aucs, v10, v01 = _components(y, s)
    cov = np.cov(v10) / m + np.cov(v01) / n
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    diff = float(aucs[0] - aucs[1])
    se = math.sqrt(max(var, 0.0))
    z = diff / se if se > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))
    return DeLongResult(float(aucs[0]), float(aucs[1]), diff, se, z, float(2 * norm.sf(abs(z))), m, n)
