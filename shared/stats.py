"""Statistical comparison of two screening models on the same patients: DeLong's test for AUCs,
McNemar's test for the decisions behind ACC, SEN and SPC.

Two AUCs measured on the same test patients are correlated; comparing their confidence
intervals as if independent is wrong. DeLong, DeLong & Clarke-Pearson (1988) estimate the
covariance of the two AUCs from the structural components of the Mann-Whitney statistic; the
fast version (Sun & Xu 2014) gets them from midranks. Written here because neither sklearn nor
scipy has it and the packages that do (MLstatkit, rocauc-comparison) are small single-author
projects outside our stack; ``tests/test_stats.py`` checks it against a paired bootstrap.

Which of these a real federation can run (per-patient scores never leave a site):

- DeLong needs every patient's two scores (its structural components compare each positive
  with every negative across all sites): simulation and the pooled baseline only. What a
  federation can do instead is site-level (each site runs DeLong on its own test patients and
  releases the difference and its SE, which a meta-analysis combines), or compare the pooled
  histogram AUCs the sites already release (``shared.metrics.histogram_auc``), which are the
  marginal score histograms of each model: that ignores the pairing, so it is conservative.
- McNemar needs only two counts: b (patients model A gets right and B wrong) and c (the other
  way round). A site can count them at the operating thresholds and release them like its
  confusion counts (noised under a release policy); summed over sites they give the federated
  test (``mcnemar``). Computed from per-patient decisions (``mcnemar_decisions``) it is for
  simulation only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest, chi2, norm, rankdata


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


EXACT_BELOW = 25  # discordant pairs under which McNemar's test uses the exact binomial (the usual rule)


@dataclass(frozen=True)
class McNemarResult:
    b: int  # discordant: A right, B wrong
    c: int  # discordant: A wrong, B right
    statistic: float  # chi-square (continuity-corrected), or b for the exact test
    p: float  # two-sided
    exact: bool


def mcnemar(b: int, c: int, exact: bool | None = None) -> McNemarResult:
    """McNemar's test of paired decisions from the two discordant counts.

    ``exact``: the exact binomial test (b ~ Binomial(b + c, 1/2), scipy's ``binomtest``); None
    chooses it when b + c < EXACT_BELOW, else the chi-square with continuity correction,
    (|b - c| - 1)^2 / (b + c) on 1 degree of freedom. scipy has the binomial and the chi-square;
    statsmodels (which has ``mcnemar``) is not a dependency. Counts only: a federation can sum
    the sites' released counts and test them here.
    """
    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise ValueError(f"McNemar's test needs discordant counts >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return McNemarResult(b, c, 0.0, 1.0, bool(exact) if exact is not None else True)
    use_exact = n < EXACT_BELOW if exact is None else exact
    if use_exact:
        return McNemarResult(b, c, float(b), float(min(1.0, binomtest(b, n, 0.5).pvalue)), True)
    stat = (abs(b - c) - 1.0) ** 2 / n
    return McNemarResult(b, c, stat, float(chi2.sf(stat, 1)), False)


def mcnemar_decisions(labels, pred_a, pred_b) -> dict[str, McNemarResult]:
    """McNemar's test for ACC (all patients), SEN (the positives) and SPC (the negatives) of two
    models' 0/1 decisions on the same patients (simulation / pooled baseline: per-patient data)."""
    y = np.asarray(labels).astype(int)
    a, b = np.asarray(pred_a).astype(int), np.asarray(pred_b).astype(int)
    if not y.size == a.size == b.size:
        raise ValueError(f"{y.size} labels, {a.size} and {b.size} decisions: both models must decide on the same patients")
    right_a, right_b = a == y, b == y
    out = {}
    for name, rows in (("acc", np.ones_like(y, dtype=bool)), ("sen", y == 1), ("spc", y == 0)):
        ra, rb = right_a[rows], right_b[rows]
        out[name] = mcnemar(int((ra & ~rb).sum()), int((~ra & rb).sum()))
    return out
