"""Screening metrics: the six numbers the MM-CL paper reports (AUC, ACC, F1, SEN, SPC, PRE).

sklearn computes each one; this module only fixes the conventions fedmsk reports with
(binary tasks: class 1 is positive, predicted positive when its probability reaches the
operating threshold; multi-class tasks: macro averages, one-vs-rest AUC) and keeps the
confusion counts, so that metrics pooled over sites can be computed exactly from counts.

Pooled ROC without per-patient scores. For binary tasks every site also reports, per class,
how many of its patients' positive-class scores fall in each of ``SCORE_BINS`` equal bins of
[0, 1] (keys ``hist_neg_NN`` / ``hist_pos_NN``, one scalar each, so every site sends the same
keys, as Flower's reply-consistency rule wants). Summed over sites they give the pooled ROC at
every bin edge: the AUC of the binned scores (pairs in one bin count one half; within 0.005
of the exact pooled AUC on the benchmark's federations, ``tests/test_metrics.py``) and the
exact confusion counts at any bin-edge threshold. The operating threshold is chosen on the
pooled *validation* histograms (``choose_threshold``: Youden's J or a target sensitivity),
and is a bin edge, so the test-split metrics at it follow exactly from the test histograms.

Privacy note: every histogram bin, like tp/fp/tn/fn and num-examples, is a count of patients.
``count_keys`` lists those keys, for whoever adds noise to released counts under a site's
privacy policy; which patient fell in which bin never leaves the site.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score

from shared.grading import grading_metrics

METRIC_NAMES = ("auc", "acc", "f1", "sen", "spc", "pre")
SCORE_BINS = 50  # fixed grid of the score histograms: bin k holds scores in [k/50, (k+1)/50)
HIST_NEG = tuple(f"hist_neg_{k:02d}" for k in range(SCORE_BINS))
HIST_POS = tuple(f"hist_pos_{k:02d}" for k in range(SCORE_BINS))
HIST_KEYS = HIST_NEG + HIST_POS
CONFUSION_KEYS = ("tp", "fp", "tn", "fn")
OPERATING_POINTS = ("youden", "sensitivity", "fixed")


def count_keys() -> frozenset[str]:
    """Every evaluation metric key whose value is a count of patients (noise these under DP)."""
    return frozenset(HIST_KEYS + CONFUSION_KEYS + ("num-examples",))


def _safe_div(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def auc_score(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC; NaN when the labels hold a single class (AUC is undefined there)."""
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    present = np.unique(labels)
    if present.size < 2:
        return math.nan
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


def score_histograms(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Per-class counts of positive-class scores on the fixed ``SCORE_BINS`` grid (binary tasks)."""
    labels = np.asarray(labels).astype(int)
    bins = np.clip((np.asarray(scores, dtype=np.float64) * SCORE_BINS).astype(int), 0, SCORE_BINS - 1)
    neg = np.bincount(bins[labels == 0], minlength=SCORE_BINS)
    pos = np.bincount(bins[labels == 1], minlength=SCORE_BINS)
    return {k: float(v) for k, v in zip(HIST_KEYS, np.concatenate([neg, pos]))}


def histograms_of(rows: list[dict[str, float]] | dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """(negatives, positives) per bin, summed over one or several sites' metric rows."""
    rows = [rows] if isinstance(rows, dict) else rows
    neg = np.array([sum(float(r[k]) for r in rows) for k in HIST_NEG])
    pos = np.array([sum(float(r[k]) for r in rows) for k in HIST_POS])
    return np.clip(neg, 0.0, None), np.clip(pos, 0.0, None)  # a noised release can dip below zero


def histogram_auc(neg: np.ndarray, pos: np.ndarray) -> float:
    """AUC of binned scores: P(score_pos > score_neg), pairs in the same bin counted 1/2."""
    n_neg, n_pos = float(neg.sum()), float(pos.sum())
    if n_neg == 0 or n_pos == 0:
        return math.nan
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    return float((pos * (below + 0.5 * neg)).sum() / (n_neg * n_pos))


def histogram_counts(neg: np.ndarray, pos: np.ndarray, threshold: float) -> dict[str, float]:
    """Confusion counts when a score >= ``threshold`` (rounded to the nearest bin edge) is positive."""
    k = int(round(threshold * SCORE_BINS))
    tp, fp = float(pos[k:].sum()), float(neg[k:].sum())
    return {"tp": tp, "fp": fp, "tn": float(neg.sum()) - fp, "fn": float(pos.sum()) - tp}


def choose_threshold(neg: np.ndarray, pos: np.ndarray, rule: str = "youden", target_sensitivity: float = 0.8) -> float:
    """The operating threshold (a bin edge) from validation histograms.

    ``youden``: maximise SEN + SPC - 1 (the lowest such edge on ties); ``sensitivity``: the
    highest edge whose sensitivity still reaches ``target_sensitivity``; ``fixed``: 0.5.
    With one class missing from the histograms there is nothing to choose from: 0.5.
    """
    if rule not in OPERATING_POINTS:
        raise ValueError(f"operating point '{rule}' is not one of {OPERATING_POINTS}")
    n_neg, n_pos = float(neg.sum()), float(pos.sum())
    if rule == "fixed" or n_neg == 0 or n_pos == 0:
        return 0.5
    # sensitivity / false-positive rate when the threshold is edge k = 0 .. SCORE_BINS
    sen = np.concatenate([np.cumsum(pos[::-1])[::-1], [0.0]]) / n_pos
    fpr = np.concatenate([np.cumsum(neg[::-1])[::-1], [0.0]]) / n_neg
    if rule == "youden":
        k = int(np.argmax(sen - fpr))
    else:
        k = int(np.nonzero(sen >= target_sensitivity - 1e-12)[0].max())
    return k / SCORE_BINS


def histogram_metrics(neg: np.ndarray, pos: np.ndarray, threshold: float) -> dict[str, float]:
    """AUC and the threshold metrics (with counts) of binned scores at ``threshold``."""
    counts = histogram_counts(neg, pos, threshold)
    return {"auc": histogram_auc(neg, pos), **counts_metrics(**counts), **counts, "threshold": float(threshold)}


def classification_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """AUC, ACC, F1, SEN, SPC, PRE and the confusion counts for one set of predictions.

    ``probs`` is [N, C] class probabilities. For C == 2 the counts are the binary
    tp/fp/tn/fn with "positive" meaning p1 >= ``threshold``, and the score histograms
    (``score_histograms``) are included; for C > 2 the prediction is the argmax,
    SEN/SPC/PRE/F1 are macro averages over classes (one-vs-rest) and the counts are summed over
    those one-vs-rest tables.
    """
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = probs.shape[1]
    pred = (probs[:, 1] >= threshold).astype(int) if n_classes == 2 else probs.argmax(axis=1)
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
        out.update(grading_metrics(labels, probs))  # confusion cells, per-class F1, screening view (shared.grading)
    out["auc"] = auc_score(labels, probs)
    out.update(tp=float(tp), fp=float(fp), tn=float(tn), fn=float(fn))
    if n_classes == 2:
        out.update(score_histograms(labels, probs[:, 1]))
    return out
