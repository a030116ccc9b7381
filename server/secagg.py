"""Secure aggregation (SecAgg+): the server only ever sees the sum of the sites' updates.

Flower 1.41 offers SecAgg+ only in the legacy workflow: ``DefaultWorkflow(fit_workflow=
SecAggPlusWorkflow(...))`` driving a legacy strategy through a ``LegacyContext``; the sites run
``client/secagg_app.py`` (a legacy NumPyClient over the same ``run_train``). This module wires
that workflow to fedmsk's config and run folder, and chooses the quantisation from the data:

- Each site scales its parameters by ``num_examples / max_weight`` and clips them to
  ``[-clipping_range, clipping_range]`` before quantising to ``quantization_range`` levels
  (2**22). Flower's defaults (max_weight 1000, clipping 8.0) waste most of those levels on a
  small model trained on tens of patients. Here ``max_weight`` is the largest real training
  count (asked from the sites before the first round; counts are not secret, plain FedAvg
  reports them too) and ``clipping_range`` follows the current global weights each round
  (``headroom`` times their largest magnitude), so the error stays near
  ``clipping_range / quantization_range`` per parameter.
- ``num_shares`` is the number of sites and ``reconstruction_threshold`` leaves room for the
  configured number of dropouts; fewer than 3 sites is refused (with two, each learns the
  other's update from the sum).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.common import GetPropertiesIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import MessageTypeLegacy
from flwr.compat.common.recorddict_compat import getpropertiesins_to_recorddict, recorddict_to_getpropertiesres
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp import Grid

from shared.config import ConfigError, FedmskConfig, to_yaml
from shared.messages import JOB_KEY, NUM_EXAMPLES, RUN_ID_KEY, SPLIT_KEY

log = logging.getLogger("fedmsk.secagg")

MIN_SITES = 3
QUANTIZATION_RANGE = 2**22


@dataclass(frozen=True)
class SecAggPlan:
    """SecAgg+ settings for one run (see the module docstring for how each is chosen)."""

    num_shares: int
    reconstruction_threshold: int
    max_weight: float
    headroom: float = 4.0
    min_clipping_range: float = 0.5

    def clipping_range(self, arrays: list[np.ndarray]) -> float:
        largest = max((float(np.max(np.abs(a))) for a in arrays if a.size), default=0.0)
        return max(self.min_clipping_range, self.headroom * largest)


def plan_secagg(train_counts: list[int], max_dropouts: int) -> SecAggPlan:
    """Shares, threshold and max_weight from the live sites' training counts; refuses < 3 sites."""
    n = len(train_counts)
    if n < MIN_SITES:
        raise ConfigError(
            f"secure aggregation needs at least {MIN_SITES} sites and {n} joined: with fewer, a site can "
            "recover another's update from the sum. Add sites or set secure_aggregation=false."
        )
    threshold = n - max_dropouts
    if max_dropouts < 0 or threshold < 2 or threshold <= n // 2:
        raise ConfigError(
            f"secure aggregation with {n} sites tolerates at most {(n - 1) // 2} dropouts "
            f"(the reconstruction threshold must stay above half the sites); {max_dropouts} were asked for"
        )
    if min(train_counts) < 1:
        raise ConfigError("a site reported no training patients; it cannot take part in secure aggregation")
    return SecAggPlan(num_shares=n, reconstruction_threshold=threshold, max_weight=float(max(train_counts)))


class AdaptiveSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ fit workflow with the clipping range recomputed from the global weights each round."""

    def __init__(self, plan: SecAggPlan, timeout: float | None = None) -> None:
        super().__init__(num_shares=plan.num_shares, reconstruction_threshold=plan.reconstruction_threshold,
                         max_weight=plan.max_weight, quantization_range=QUANTIZATION_RANGE, timeout=timeout)
        self.plan = plan

    def __call__(self, grid: Grid, context: Context) -> None:
        current = context.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
        self.clipping_range = self.plan.clipping_range(current)
        log.info("SecAgg+: max_weight %.0f, clipping range %.4g, %d shares, threshold %d",
                 self.max_weight, self.clipping_range, self.num_shares, self.reconstruction_threshold)
        super().__call__(grid, context)


def query_train_counts(grid: Grid, node_ids: list[int], job_yaml: str, timeout: float) -> dict[int, int]:
    """Ask each site for its training count (a legacy get_properties message)."""
    content = getpropertiesins_to_recorddict(GetPropertiesIns(config={JOB_KEY: job_yaml}))
    msgs = [Message(RecordDict(dict(content)), dst_node_id=nid, message_type=MessageTypeLegacy.GET_PROPERTIES) for nid in node_ids]
    counts = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            log.warning("node %s did not report its training count: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        counts[reply.metadata.src_node_id] = int(recorddict_to_getpropertiesres(reply.content).properties[NUM_EXAMPLES])
    return counts


def wait_for_sites(grid: Grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= minimum or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


class RecordingFedAvg(LegacyFedAvg):
    """Flower's legacy FedAvg, writing each round's aggregate to the run folder (checkpoint + metrics)."""

    def __init__(self, recorder, names: list[str], **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.recorder, self.names = recorder, names

    def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        params, metrics = super().aggregate_fit(server_round, results, failures)
        for failure in failures:
            self.recorder.event(server_round, "global", "site update missing", repr(failure)[:300])
        if params is not None:
            self.recorder.checkpoint(server_round, named_arrays(self.names, parameters_to_ndarrays(params)))
        return params, metrics

    def aggregate_evaluate(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        from server.strategy import pool_site_metrics

        loss, _ = super().aggregate_evaluate(server_round, results, failures)
        rows = [dict(res.metrics) for _, res in results]
        if rows:
            self.recorder.metrics(server_round, "evaluate", "global", pool_site_metrics(rows), split="val")
        return loss, {}


def named_arrays(names: list[str], arrays: list[np.ndarray]) -> ArrayRecord:
    import torch

    return ArrayRecord({k: torch.from_numpy(np.asarray(a)) for k, a in zip(names, arrays)})


def run_secure_federation(grid: Grid, context: Context, cfg: FedmskConfig, run_dir: Path, max_dropouts: int = 1) -> ArrayRecord:
    """Every round with SecAgg+; checkpoints and validation metrics go to ``run_dir`` as in plain runs."""
    import torch

    from client.trainer import build_screener
    from server.report import RunRecorder

    recorder = RunRecorder(run_dir, cfg)
    job_yaml = to_yaml(cfg)
    timeout = cfg.strategy.round_timeout_s
    nodes = wait_for_sites(grid, max(MIN_SITES, cfg.strategy.min_available_nodes), timeout=min(timeout, 120.0))
    counts = query_train_counts(grid, nodes, job_yaml, timeout)
    plan = plan_secagg(list(counts.values()), max_dropouts)
    recorder.event(0, "global", "secure aggregation", f"{plan.num_shares} sites, threshold {plan.reconstruction_threshold}, "
                   f"max_weight {plan.max_weight:.0f}")

    torch.manual_seed(cfg.seed)  # the same initial model as a plain run with this seed
    state = build_screener(cfg).state_dict()
    names = list(state)
    initial = [v.detach().cpu().numpy() for v in state.values()]
    base = {JOB_KEY: job_yaml, RUN_ID_KEY: run_dir.name}
    strategy = RecordingFedAvg(
        recorder, names,
        fraction_fit=1.0, fraction_evaluate=cfg.strategy.fraction_evaluate,
        min_fit_clients=plan.reconstruction_threshold, min_evaluate_clients=min(cfg.strategy.min_evaluate_nodes, len(counts)),
        min_available_clients=plan.num_shares,
        initial_parameters=ndarrays_to_parameters(initial),
        on_fit_config_fn=lambda rnd: base | {"server-round": rnd},
        on_evaluate_config_fn=lambda rnd: base | {SPLIT_KEY: "val"},
    )
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.rounds, round_timeout=timeout), strategy=strategy)
    DefaultWorkflow(fit_workflow=AdaptiveSecAggPlusWorkflow(plan, timeout=timeout))(grid, legacy)
    final = named_arrays(names, legacy.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays())
    recorder.finish(final)
    return final
