"""Screening metrics: the six numbers the MM-CL paper reports (AUC, ACC, F1, SEN, SPC, PRE).

sklearn computes each one; this module only fixes the conventions fedmsk reports with
(binary tasks: class 1 is positive, threshold 0.5 on its probability; multi-class tasks:
macro averages, one-vs-rest AUC) and keeps the confusion counts, so that metrics pooled over
sites can be computed exactly from counts without any per-patient score leaving a site.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score

METRIC_NAMES = ("auc", "acc", "f1", "sen", "spc", "pre")


def _safe_div(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def auc_score(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC; NaN when the labels hold a single class (AUC is undefined there)."""
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    present = np.unique(labels)
    if present.size < 2:
        return math.nan
from shared.grading import grading_metrics

    if probs.ndim == 1 or probs.shape[1] == 2:
        score = probs if probs.ndim == 1 else probs[:, 1]
        return float(roc_auc_score(labels, score))
    if present.size < probs.shape[1]:
        return math.nan
    return float(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))


def counts_metrics(tp: float, fp: float, tn: float, fn: float) -> dict[str, float]:
    """Threshold metrics from binary confusion counts (also used to pool counts over sites)."""
    sen = _safe_div(tp, tp + fn)
    pre = _safe_div(tp, tp + fp)
    return {
        "acc": _safe_div(tp + tn, tp + fp + tn + fn),
        "sen": sen,
        "spc": _safe_div(tn, tn + fp),
        "pre": pre,
        "f1": _safe_div(2 * pre * sen, pre + sen),
    }


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUC, ACC, F1, SEN, SPC, PRE and the confusion counts for one set of predictions.

    ``probs`` is [N, C] class probabilities. For C == 2 the counts are the binary
    tp/fp/tn/fn at threshold 0.5; for C > 2 SEN/SPC/PRE/F1 are macro averages over classes
    (one-vs-rest) and the counts are summed over those one-vs-rest tables.
    """
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = probs.shape[1]
    pred = probs.argmax(axis=1)
    cm = confusion_matrix(labels, pred, labels=list(range(n_classes))).astype(float)
    if n_classes == 2:
        tn, fp, fn, tp = cm.ravel()
        out = counts_metrics(tp, fp, tn, fn)
    else:
        per_class = []
        tp = fp = tn = fn = 0.0
        for c in range(n_classes):
            c_tp = cm[c, c]
            c_fp = cm[:, c].sum() - c_tp
            c_fn = cm[c, :].sum() - c_tp
            c_tn = cm.sum() - c_tp - c_fp - c_fn
            per_class.append(counts_metrics(c_tp, c_fp, c_tn, c_fn))
            tp, fp, tn, fn = tp + c_tp, fp + c_fp, tn + c_tn, fn + c_fn
        out = {k: float(np.mean([m[k] for m in per_class])) for k in ("sen", "spc", "pre", "f1")}
        out["acc"] = _safe_div(np.trace(cm), cm.sum())
    out["auc"] = auc_score(labels, probs)
    out.update(tp=float(tp), fp=float(fp), tn=float(tn), fn=float(fn))
    return out
        out.update(grading_metrics(labels, probs))  # confusion cells, per-class F1, screening view (shared.grading)
