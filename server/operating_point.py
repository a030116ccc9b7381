"""The federation's operating point: pooled ROC from the sites' score histograms, the threshold
chosen on validation, and the round whose model becomes the final one.

A site sends, with its evaluation metrics, per-class counts of its patients' positive-class
scores on a fixed grid (``shared.metrics.score_histograms``); no per-patient score leaves it.
Summed over sites they give the pooled AUC (what "AUC over all sites" means here, instead of a
mean of site AUCs) and the exact confusion counts at every grid edge. The operating threshold
is chosen on the pooled *validation* histograms (``task.operating_point``: Youden's J or a
target sensitivity) and applied unchanged to the test split, where each site's threshold
metrics are recomputed at it from its own histogram. The final model is the one of the round
with the best pooled validation AUC (early stopping on validation, resume-safe: it is read
back from the recorded rows and the round checkpoints).
"""

from __future__ import annotations

import math
from typing import Any

from shared.config import TaskConfig
from shared.metrics import HIST_KEYS, choose_threshold, counts_metrics, histogram_counts, histogram_metrics, histograms_of


def has_histograms(rows: list[dict[str, float]]) -> bool:
    return bool(rows) and all(all(k in r for k in HIST_KEYS) for r in rows)


def at_operating_point(
    rows: list[dict[str, float]], task: TaskConfig, threshold: float | None
) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Each site's metrics with its threshold metrics at the operating threshold, and the pooled
    metrics from the summed histograms (``{}`` when some site sent none, e.g. multi-class tasks).

    ``threshold`` None (a validation round): chosen here on the pooled histograms.
    """
    if not has_histograms(rows):
        return rows, {}
    neg, pos = histograms_of(rows)
    if threshold is None:
        threshold = choose_threshold(neg, pos, task.operating_point, task.target_sensitivity)
    sites = []
    for row in rows:
        counts = histogram_counts(*histograms_of(row), threshold)
        sites.append(row | counts | counts_metrics(**counts) | {"threshold": threshold})
    return sites, histogram_metrics(neg, pos, threshold)


def select_round(val_rows: list[dict[str, Any]]) -> tuple[int, float, float] | None:
    """(round, pooled val AUC, threshold) of the trained round with the best pooled validation
    AUC (the first on ties); None when no trained round has one."""
    best = None
    for row in val_rows:
        auc = row.get("auc")
        if row["round"] < 1 or auc is None or math.isnan(auc):
            continue
        if best is None or auc > best[1]:
            best = (int(row["round"]), float(auc), float(row.get("threshold", 0.5)))
    return best
