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

from shared.config import FedmskConfig
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


def _sampling(run: FedmskConfig) -> dict:
    """The FedAvg arguments every fedmsk strategy shares: sampling, minimums, metric pooling."""
    cfg = run.strategy
    return dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_nodes,
        min_evaluate_nodes=cfg.min_evaluate_nodes,
        min_available_nodes=cfg.min_available_nodes,
        evaluate_metrics_aggr_fn=pool_eval_metrics,
    )


def _fedavg(run: FedmskConfig) -> Strategy:
    return FedAvg(**_sampling(run))


def with_client_level_dp(strategy: Strategy, *, noise_multiplier: float, clipping_norm: float, num_sites: int) -> Strategy:
    """Client-level DP (DP-FedAvg): clip each site's update to ``clipping_norm``, add Gaussian noise
    of std ``noise_multiplier * clipping_norm / num_sites`` to the average (Flower's
    DifferentialPrivacyServerSideFixedClipping). The noise assumes an unweighted mean over sites:
    wrap a FedAvg whose weights are equal. Noise and epsilon: client.privacy.client_level_noise /
    client_level_epsilon (every site every round, RDP).
    """
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

    return DifferentialPrivacyServerSideFixedClipping(strategy, noise_multiplier, clipping_norm, num_sites)


class EqualWeightFedAvg(FedAvg):
    """FedAvg in which every site weighs the same.

    DP-FedAvg's noise (std noise_multiplier * clip / sites) is calibrated for the plain mean of
    clipped updates; an example-weighted mean lets one large site move the model by more than
    clip / sites and the guarantee would not hold. The per-site counts are already recorded by
    the round loop before aggregation; here only the aggregation weight is set to 1.
    """

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        for reply in replies:
            if not reply.has_error():
                next(iter(reply.content.metric_records.values()))[self.weighted_by_key] = 1
        return super().aggregate_train(server_round, replies)


def _dp_fedavg(run: FedmskConfig) -> Strategy:
    """Client-level DP: every site clipped to client_dp_clip, noise for client_dp_epsilon over the run.

    The noise multiplier comes from Opacus' RDP accountant (client.privacy.client_level_noise)
    for ``rounds`` releases with every site taking part; ``min_train_nodes`` is the site count
    the noise is scaled by, which errs on the safe side when more sites answer.
    """
    from client.privacy import client_level_noise

    cfg = run.strategy
    inner = EqualWeightFedAvg(**_sampling(run))
    noise = client_level_noise(cfg.client_dp_epsilon, cfg.client_dp_delta, run.rounds)
    return with_client_level_dp(inner, noise_multiplier=noise, clipping_norm=cfg.client_dp_clip, num_sites=cfg.min_train_nodes)


STRATEGIES: dict[str, Callable[[FedmskConfig], Strategy]] = {"fedavg": _fedavg, "dp_fedavg": _dp_fedavg}


def build_strategy(cfg: FedmskConfig) -> Strategy:
    return STRATEGIES[cfg.strategy.name](cfg)
