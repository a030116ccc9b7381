"""DeLong's test against sklearn's AUC and a paired bootstrap."""

import numpy as np
import pytest
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from shared.stats import delong_test


def _two_models(rng, n=300, shift_b=0.0):
    y = (rng.random(n) < 0.35).astype(int)
    latent = y + rng.normal(0, 1.0, n)
    a = latent + rng.normal(0, 0.6, n)  # two correlated scores of the same patients
    b = latent + rng.normal(0, 0.6, n) - shift_b * y
    return y, a, b


def test_delong_aucs_are_sklearns_and_its_se_matches_a_paired_bootstrap():
    rng = np.random.default_rng(0)
    y, a, b = _two_models(rng, shift_b=0.4)
    res = delong_test(y, a, b)
    assert res.auc_a == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert res.auc_b == pytest.approx(roc_auc_score(y, b), abs=1e-12)
    def auc(labels, scores):  # Mann-Whitney via ranks: what roc_auc_score computes, without its per-call overhead
        r = rankdata(scores)
        m = labels.sum()
        return (r[labels == 1].sum() - m * (m + 1) / 2) / (m * (len(labels) - m))

    diffs = []
    for _ in range(1000):
        i = rng.integers(0, len(y), len(y))
        if y[i].min() == y[i].max():
            continue
        diffs.append(auc(y[i], a[i]) - auc(y[i], b[i]))
    boot_se = float(np.std(diffs, ddof=1))
    assert res.se == pytest.approx(boot_se, rel=0.12), (res.se, boot_se)
    assert res.p < 0.05 and res.ci()[0] > 0  # b was made worse: detected


def test_delong_on_identical_models_and_bad_input():
    rng = np.random.default_rng(1)
    y, a, _ = _two_models(rng)
    same = delong_test(y, a, a)
    assert same.diff == 0 and same.p == 1.0
    with pytest.raises(ValueError, match="same patients"):
        delong_test(y, a, a[:-1])
    with pytest.raises(ValueError, match="2 positives"):
        delong_test(np.zeros(10), np.arange(10), np.arange(10))


def test_mcnemar_matches_published_tables():
    from shared.stats import mcnemar, mcnemar_decisions

    # Agresti, Categorical Data Analysis (2nd ed., table 10.1): approval of the Prime Minister in two
    # surveys, 794 / 150 / 86 / 570; uncorrected z^2 = (150-86)^2/236 = 17.36, corrected 16.82, p < 0.001
    big = mcnemar(150, 86)
    assert not big.exact
    assert big.statistic == pytest.approx((64 - 1) ** 2 / 236)
    assert big.p == pytest.approx(4.11e-5, rel=0.01)
    # exact binomial for few discordant pairs: b=1, c=9 -> p = 2 * P(X <= 1 | 10, 1/2) = 2 * 11 / 1024
    small = mcnemar(1, 9)
    assert small.exact and small.p == pytest.approx(22 / 1024)
    assert mcnemar(5, 5).p == 1.0 and mcnemar(0, 0).p == 1.0
    with pytest.raises(ValueError, match="b=-1"):
        mcnemar(-1, 2)
    # per-patient decisions: SEN counts only the positives, SPC only the negatives
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    a = np.array([1, 1, 1, 1, 0, 0, 0, 0])  # all right
    b = np.array([0, 0, 0, 1, 0, 0, 0, 1])  # misses 3 positives, one false positive
    res = mcnemar_decisions(y, a, b)
    assert (res["acc"].b, res["acc"].c) == (4, 0)
    assert (res["sen"].b, res["sen"].c) == (3, 0) and res["sen"].p == pytest.approx(0.25)
    assert (res["spc"].b, res["spc"].c) == (1, 0)
    with pytest.raises(ValueError, match="same patients"):
        mcnemar_decisions(y, a, b[:-1])
