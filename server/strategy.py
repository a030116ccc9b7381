"""Aggregation strategies, chosen by name from ``configs/strategy/*.yaml``.

The arithmetic is Flower's (``flwr.serverapp.strategy``); this module only maps a config
to a strategy object and supplies the evaluation-metric aggregation fedmsk reports:
threshold metrics pooled exactly from the sites' confusion counts, AUC and loss as
example-weighted means over sites (AUC cannot be pooled without per-patient scores, which
never leave a site).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, Strategy

from shared.config import StrategyConfig
from shared.messages import NUM_EXAMPLES
from shared.metrics import counts_metrics


def pool_site_metrics(rows: list[dict[str, float]], weight_key: str = NUM_EXAMPLES) -> dict[str, float]:
    """Pool sites' evaluation metrics: counts summed, AUC/loss weighted by examples."""
    n = [float(row[weight_key]) for row in rows]
    out: dict[str, float] = {weight_key: sum(n)}
    counts = {k: sum(float(row[k]) for row in rows) for k in ("tp", "fp", "tn", "fn")}
    out.update(counts)
    out.update(counts_metrics(counts["tp"], counts["fp"], counts["tn"], counts["fn"]))
    for key in ("auc", "loss"):
        pairs = [(float(row[key]), w) for row, w in zip(rows, n) if not math.isnan(float(row[key]))]
        total = sum(w for _, w in pairs)
        out[key] = sum(v * w for v, w in pairs) / total if total else math.nan
    return out


def pool_eval_metrics(records: list[RecordDict], weight_key: str = NUM_EXAMPLES) -> MetricRecord:
    """Flower's ``evaluate_metrics_aggr_fn`` hook around ``pool_site_metrics``."""
    return MetricRecord(pool_site_metrics([dict(next(iter(r.metric_records.values()))) for r in records], weight_key))


def _fedavg(cfg: StrategyConfig) -> Strategy:
    return FedAvg(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_nodes,
        min_evaluate_nodes=cfg.min_evaluate_nodes,
        min_available_nodes=cfg.min_available_nodes,
        evaluate_metrics_aggr_fn=pool_eval_metrics,
    )


def with_client_level_dp(strategy: Strategy, *, noise_multiplier: float, clipping_norm: float, num_sites: int) -> Strategy:
    """Client-level DP (DP-FedAvg): clip each site's update to ``clipping_norm``, add Gaussian noise
    of std ``noise_multiplier * clipping_norm / num_sites`` to the average (Flower's
    DifferentialPrivacyServerSideFixedClipping). The noise assumes an unweighted mean over sites:
    wrap a FedAvg whose weights are equal. Noise and epsilon: client.privacy.client_level_noise /
    client_level_epsilon (every site every round, RDP).
    """
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

    return DifferentialPrivacyServerSideFixedClipping(strategy, noise_multiplier, clipping_norm, num_sites)


STRATEGIES: dict[str, Callable[[StrategyConfig], Strategy]] = {"fedavg": _fedavg}


def build_strategy(cfg: StrategyConfig) -> Strategy:
    return STRATEGIES[cfg.name](cfg)
