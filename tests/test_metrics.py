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
