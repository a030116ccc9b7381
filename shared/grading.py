"""Genant grading metrics: per-grade F1, the confusion matrix, and the screening output.

A multi-class (grade) task reports, besides shared.metrics' macro averages, what a grading
study reads: F1 per grade, the full confusion matrix (``cm_<true><predicted>``, e.g. ``cm_31``: grade 3 called 1), and the
binary screening view fracture yes/no, whose score is P(grade >= 1) = 1 - p(grade 0), with
AUC, sensitivity and specificity at 0.5. Everything a site sends is a count or a scalar, so
``pool_grading`` recomputes the pooled macro-F1, per-grade F1 and screening SEN/SPC exactly
from the sites' summed confusion counts, and the pooled screening AUC from the sites' summed
screening-score histograms (``screen_hist_neg_NN`` / ``screen_hist_pos_NN``: shared.metrics'
binned-ROC machinery on 1 - p0); no per-patient score leaves a site.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix

MAX_CLASSES = 6  # the wire whitelist holds confusion cells and per-class F1 up to this many classes
COUNT_PREFIXES = ("cm_", "screen_tp", "screen_fp", "screen_tn", "screen_fn", "screen_hist")  # keys that count patients
SCREEN_HIST = "screen_"  # prefix on shared.metrics' histogram keys for the screening score
SCREEN_COUNTS = ("screen_tp", "screen_fp", "screen_tn", "screen_fn")


def grading_metric_keys(max_classes: int = MAX_CLASSES) -> frozenset[str]:
    """Every metric key ``grading_metrics`` can produce (shared.messages' evaluation whitelist)."""
    from shared.metrics import HIST_KEYS

    cells = {f"cm_{t}{p}" for t in range(max_classes) for p in range(max_classes)}
    return frozenset(cells | {f"f1_class{k}" for k in range(max_classes)} | set(SCREEN_COUNTS)
                     | {"screen_auc", "screen_sen", "screen_spc"} | {SCREEN_HIST + k for k in HIST_KEYS})


def _div(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def from_confusion(cm: np.ndarray) -> dict[str, float]:
    """Per-class F1 and the macro averages (F1, SEN, SPC, PRE) and ACC of a confusion matrix [true, pred]."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    fp, fn = cm.sum(axis=0) - tp, cm.sum(axis=1) - tp
    tn = cm.sum() - tp - fp - fn
    f1 = [_div(2 * t, 2 * t + p + n) for t, p, n in zip(tp, fp, fn)]
    out = {f"f1_class{k}": v for k, v in enumerate(f1)}
    out.update(f1=float(np.mean(f1)), acc=_div(tp.sum(), cm.sum()),
               sen=float(np.mean([_div(t, t + n) for t, n in zip(tp, fn)])),
               spc=float(np.mean([_div(t, t + p) for t, p in zip(tn, fp)])),
               pre=float(np.mean([_div(t, t + p) for t, p in zip(tp, fp)])))
    return out


def screening(tp: float, fp: float, tn: float, fn: float) -> dict[str, float]:
    return {"screen_sen": _div(tp, tp + fn), "screen_spc": _div(tn, tn + fp)}


def grading_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Confusion cells, per-class F1 and the screening metrics for grades ``probs`` [N, C], C > 2."""
    from shared.metrics import auc_score, score_histograms

    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = probs.shape[1]
    cm = confusion_matrix(labels, probs.argmax(axis=1), labels=list(range(n_classes)))
    out = {f"cm_{t}{p}": float(cm[t, p]) for t in range(n_classes) for p in range(n_classes)}
    out.update({k: v for k, v in from_confusion(cm).items() if k.startswith("f1_class")})
    score = 1.0 - probs[:, 0]
    positive, called = labels > 0, score >= 0.5
    counts = dict(zip(SCREEN_COUNTS, (float(np.sum(called & positive)), float(np.sum(called & ~positive)),
                                      float(np.sum(~called & ~positive)), float(np.sum(~called & positive)))))
    out.update(counts)
    out.update(screening(*counts.values()))
    out["screen_auc"] = auc_score(positive.astype(int), score)
    out.update({SCREEN_HIST + k: v for k, v in score_histograms(positive.astype(int), score).items()})
    return out


def pool_grading(rows: list[dict[str, float]]) -> dict[str, float]:
    """Pooled grading metrics from the sites' rows: exact from summed counts; {} for a binary task."""
    from shared.metrics import HIST_KEYS, histogram_auc, histograms_of

    if not rows or "cm_00" not in rows[0]:
        return {}
    n_classes = sum(1 for k in rows[0] if k.startswith("cm_0"))
    cm = np.array([[sum(float(r[f"cm_{t}{p}"]) for r in rows) for p in range(n_classes)] for t in range(n_classes)])
    out = {f"cm_{t}{p}": float(cm[t, p]) for t in range(n_classes) for p in range(n_classes)}
    out.update(from_confusion(cm))
    counts = {k: sum(float(r[k]) for r in rows) for k in SCREEN_COUNTS}
    out.update(counts)
    out.update(screening(*counts.values()))
    hists = [{k.removeprefix(SCREEN_HIST): float(v) for k, v in r.items() if k.startswith(SCREEN_HIST + "hist")} for r in rows]
    neg, pos = histograms_of(hists)
    out.update({SCREEN_HIST + k: float(v) for k, v in zip(HIST_KEYS, np.concatenate([neg, pos]))})
    out["screen_auc"] = histogram_auc(neg, pos)  # binned pooled ROC (tests/test_metrics: within 0.005 of exact)
    return out
