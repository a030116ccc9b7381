"""Aggregation strategies, chosen by name from ``configs/strategy/*.yaml``.

The arithmetic is Flower's (``flwr.serverapp.strategy``: FedAvg, FedProx, FedAdam, FedYogi,
FedMedian, FedTrimmedAvg, Krum, MultiKrum, the DP clipping wrapper); this module only maps a
config to a strategy object, checks the strategy's settings at start (``check_strategy``), and
supplies the evaluation-metric aggregation fedmsk reports:
threshold metrics pooled exactly from the sites' confusion counts, AUC and loss as
example-weighted means over sites (AUC cannot be pooled without per-patient scores, which
never leave a site).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, Strategy

from shared.config import FedmskConfig, register_check
from shared.messages import NUM_EXAMPLES
from shared.grading import pool_grading
from shared.metrics import counts_metrics


def pool_site_metrics(rows: list[dict[str, float]], weight_key: str = NUM_EXAMPLES) -> dict[str, float]:
    """Pool sites' evaluation metrics: counts summed, AUC/loss weighted by examples."""
    n = [float(row[weight_key]) for row in rows]
    out: dict[str, float] = {weight_key: sum(n)}
    if rows and "tp" not in rows[0]:  # a pretraining job's evaluation: its loss and patient count only
        pairs = [(float(row["loss"]), w) for row, w in zip(rows, n) if w > 0 and not math.isnan(float(row["loss"]))]
        total = sum(w for _, w in pairs)
        return out | {"loss": sum(v * w for v, w in pairs) / total if total else math.nan}
    counts = {k: sum(float(row[k]) for row in rows) for k in ("tp", "fp", "tn", "fn")}
    out.update(counts)
    out.update(counts_metrics(counts["tp"], counts["fp"], counts["tn"], counts["fn"]))
    for key in ("auc", "loss"):
        pairs = [(float(row[key]), w) for row, w in zip(rows, n) if not math.isnan(float(row[key]))]
        total = sum(w for _, w in pairs)
        out[key] = sum(v * w for v, w in pairs) / total if total else math.nan
    out.update(pool_grading(rows))  # grade tasks: macro averages from the summed confusion matrix
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


def _fedprox(run: FedmskConfig) -> Strategy:
    """FedProx: Flower's class sends ``proximal-mu``; each site adds the term (client.proximal)."""
    from flwr.serverapp.strategy import FedProx

    return FedProx(**_sampling(run), proximal_mu=run.strategy.proximal_mu)


def _fedopt(cls_name: str) -> Callable[[FedmskConfig], Strategy]:
    """FedAdam / FedYogi: a server optimiser on the averaged update; its moments are checkpointed
    every round and restored on resume (server.strategy_state)."""

    def build(run: FedmskConfig) -> Strategy:
        import flwr.serverapp.strategy as strategies

        s = run.strategy
        return getattr(strategies, cls_name)(**_sampling(run), eta=s.server_lr, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau)

    return build


def _fedmedian(run: FedmskConfig) -> Strategy:
    from flwr.serverapp.strategy import FedMedian

    return FedMedian(**_sampling(run))


def _fedtrimmedavg(run: FedmskConfig) -> Strategy:
    from flwr.serverapp.strategy import FedTrimmedAvg

    return FedTrimmedAvg(**_sampling(run), beta=run.strategy.trim_beta)


def _krum(run: FedmskConfig) -> Strategy:
    from flwr.serverapp.strategy import Krum

    return Krum(**_sampling(run), num_malicious_nodes=run.strategy.num_malicious)


def _multikrum(run: FedmskConfig) -> Strategy:
    from flwr.serverapp.strategy import MultiKrum

    s = run.strategy
    return MultiKrum(**_sampling(run), num_malicious_nodes=s.num_malicious, num_nodes_to_select=s.num_selected)


STRATEGIES: dict[str, Callable[[FedmskConfig], Strategy]] = {
    "fedavg": _fedavg,
    "dp_fedavg": _dp_fedavg,
    "fedprox": _fedprox,
    "fedadam": _fedopt("FedAdam"),
    "fedyogi": _fedopt("FedYogi"),
    "fedbn": _fedavg,  # FedAvg over the shared parameters; strategy.local_params stay at the sites
    "fedmedian": _fedmedian,
    "fedtrimmedavg": _fedtrimmedavg,
    "krum": _krum,
    "multikrum": _multikrum,
}


@register_check  # run by shared.config.validate wherever this module is imported (the verbs that train)
def check_strategy(cfg: FedmskConfig) -> None:
    """Refuse strategy settings that cannot work, at start, naming the key (ConfigError)."""
    from shared.config import ConfigError

    s = cfg.strategy
    if s.name not in STRATEGIES:
        raise ConfigError(f"config 'strategy.name' is '{s.name}'; available: {', '.join(sorted(STRATEGIES))}")
    if s.proximal_mu < 0:
        raise ConfigError(f"config 'strategy.proximal_mu' is {s.proximal_mu}; it must be >= 0")
    if s.name == "fedprox" and s.proximal_mu == 0:
        raise ConfigError("config 'strategy.proximal_mu' is 0, which makes fedprox plain FedAvg; set mu > 0 or use strategy=fedavg")
    if s.proximal_mu > 0 and s.name != "fedprox":
        raise ConfigError(f"config 'strategy.proximal_mu' is set but strategy '{s.name}' never sends it; use strategy=fedprox")
    if not 0 <= s.trim_beta < 0.5:
        raise ConfigError(f"config 'strategy.trim_beta' is {s.trim_beta}; it must be in [0, 0.5)")
    if s.server_lr <= 0 or not (0 <= s.beta_1 < 1 and 0 <= s.beta_2 < 1) or s.tau <= 0:
        raise ConfigError("config 'strategy.server_lr' and 'tau' must be > 0, 'beta_1' and 'beta_2' in [0, 1)")
    if s.num_malicious < 0 or s.num_selected < 1 or s.exclude_after_rejections < 0:
        raise ConfigError("config 'strategy.num_malicious' and 'exclude_after_rejections' must be >= 0, 'num_selected' >= 1")
    if s.name in ("krum", "multikrum") and s.num_malicious and s.min_train_nodes < 2 * s.num_malicious + 3:
        raise ConfigError(
            f"config 'strategy.num_malicious' is {s.num_malicious}: Krum tolerates f byzantine sites only among "
            f"at least 2f+3 = {2 * s.num_malicious + 3}; raise strategy.min_train_nodes or lower num_malicious"
        )
    if cfg.federation.secure_aggregation and s.name != "fedavg":
        raise ConfigError(f"config 'strategy.name' is '{s.name}' but federation.secure_aggregation runs Flower's legacy "
                          f"SecAgg+ workflow, which only sums updates (FedAvg); use strategy=fedavg with it")
    if s.name == "fedbn" and not s.local_params:
        raise ConfigError("strategy 'fedbn' needs 'strategy.local_params' (e.g. ['@norm']) to name what stays at the sites")
    if s.local_params:
        if cfg.federation.secure_aggregation:
            raise ConfigError("config 'strategy.local_params' cannot be combined with federation.secure_aggregation "
                              "(SecAgg+ masks the whole parameter vector)")
        from client.local_state import local_keys
        from client.trainer import build_screener

        local_keys(build_screener(cfg), s.local_params)  # a pattern naming nothing is an error here


def build_strategy(cfg: FedmskConfig) -> Strategy:
    return STRATEGIES[cfg.strategy.name](cfg)
