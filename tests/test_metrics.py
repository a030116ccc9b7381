"""Screening metrics and the exact pooling of sites' confusion counts."""

import math

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from server.strategy import pool_eval_metrics
from shared.metrics import classification_metrics


def _probs(p1):
    p1 = np.asarray(p1, dtype=float)
    return np.stack([1 - p1, p1], axis=1)


def test_binary_metrics_match_sklearn_definitions():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    m = classification_metrics(y, _probs(p))
    pred = (p > 0.5).astype(int)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["sen"] == pytest.approx(recall_score(y, pred))
    assert m["spc"] == pytest.approx(recall_score(1 - y, 1 - pred))
    assert m["pre"] == pytest.approx(precision_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["tp"] + m["fp"] + m["tn"] + m["fn"] == 200


def test_auc_is_nan_for_a_single_class_not_a_crash():
    m = classification_metrics(np.zeros(5, dtype=int), _probs([0.1, 0.2, 0.7, 0.4, 0.3]))
    assert math.isnan(m["auc"]) and m["spc"] == pytest.approx(0.8)


def test_pooled_threshold_metrics_equal_metrics_on_pooled_predictions():
    rng = np.random.default_rng(1)
    sites = []
    for n in (40, 90, 25):
        y = rng.integers(0, 2, n)
        sites.append((y, np.clip(y * 0.25 + rng.random(n) * 0.75, 0, 1)))
    records = []
    for y, p in sites:
        m = classification_metrics(y, _probs(p)) | {"num-examples": len(y), "loss": 0.5}
        records.append(RecordDict({"metrics": MetricRecord({k: float(v) for k, v in m.items()})}))
    pooled = pool_eval_metrics(records)
    y_all = np.concatenate([y for y, _ in sites])
    p_all = np.concatenate([p for _, p in sites])
    direct = classification_metrics(y_all, _probs(p_all))
    for key in ("acc", "sen", "spc", "pre", "f1"):
        assert pooled[key] == pytest.approx(direct[key])
    weighted_auc = sum(roc_auc_score(y, p) * len(y) for y, p in sites) / len(y_all)
    assert pooled["auc"] == pytest.approx(weighted_auc)


# ------------------------------------------------------------------ score histograms, operating point
from shared.metrics import (  # noqa: E402
    HIST_KEYS,
    SCORE_BINS,
    choose_threshold,
    count_keys,
    counts_metrics,
    histogram_auc,
    histogram_counts,
    histograms_of,
)


def _site_scores(rng, n, shift):
    y = (rng.random(n) < 0.3).astype(int)
    logit = rng.normal(0.0, 1.2, n) + 1.8 * y + shift
    return y, 1.0 / (1.0 + np.exp(-logit))


def test_summed_site_histograms_give_the_pooled_roc():
    """Counts at every bin edge are exact; the binned AUC is within 0.005 of the exact pooled AUC."""
    rng = np.random.default_rng(4)
    sites = [_site_scores(rng, n, shift) for n, shift in ((60, -1.5), (45, 0.0), (35, 1.2), (50, -0.6), (40, 0.6))]
    rows = [classification_metrics(y, _probs(p)) for y, p in sites]
    assert set(HIST_KEYS) <= set(rows[0]) and set(HIST_KEYS) <= count_keys()
    neg, pos = histograms_of(rows)
    y_all = np.concatenate([y for y, _ in sites])
    p_all = np.concatenate([p for _, p in sites])
    assert neg.sum() == (y_all == 0).sum() and pos.sum() == (y_all == 1).sum()
    assert abs(histogram_auc(neg, pos) - roc_auc_score(y_all, p_all)) < 0.005
    mean_of_sites = np.mean([roc_auc_score(y, p) for y, p in sites])
    assert abs(mean_of_sites - roc_auc_score(y_all, p_all)) > 0.01  # what the histograms fix: sites' AUCs do not average to it
    for k in (7, 20, 33):
        t = k / SCORE_BINS
        pred = p_all >= t
        exact = {"tp": (pred & (y_all == 1)).sum(), "fp": (pred & (y_all == 0)).sum(),
                 "tn": (~pred & (y_all == 0)).sum(), "fn": (~pred & (y_all == 1)).sum()}
        assert histogram_counts(neg, pos, t) == {k2: float(v) for k2, v in exact.items()}
        assert classification_metrics(y_all, _probs(p_all), threshold=t)["tp"] == exact["tp"]


def test_youden_threshold_maximises_sen_plus_spc_and_target_sensitivity_is_met():
    rng = np.random.default_rng(5)
    y, p = _site_scores(rng, 300, 0.0)
    neg, pos = histograms_of(classification_metrics(y, _probs(p)))

    def j(t):
        m = counts_metrics(**histogram_counts(neg, pos, t))
        return m["sen"] + m["spc"] - 1.0

    t = choose_threshold(neg, pos, "youden")
    assert j(t) == pytest.approx(max(j(k / SCORE_BINS) for k in range(SCORE_BINS + 1)))
    assert t != 0.5  # at this prevalence the best threshold is not 0.5
    t80 = choose_threshold(neg, pos, "sensitivity", 0.8)
    sen = lambda th: counts_metrics(**histogram_counts(neg, pos, th))["sen"]  # noqa: E731
    assert sen(t80) >= 0.8 and sen(t80 + 1 / SCORE_BINS) < 0.8  # the highest edge that still reaches it
    assert choose_threshold(neg, pos, "fixed") == 0.5
    assert choose_threshold(neg, np.zeros_like(pos), "youden") == 0.5  # one class only: nothing to choose
    with pytest.raises(ValueError, match="operating point"):
        choose_threshold(neg, pos, "best")
