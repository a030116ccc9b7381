"""The coordinator's round loop.

Flower's ``Strategy.start`` runs the same configure/aggregate cycle but reports only
aggregated metrics and offers no hook between receiving replies and aggregating them. fedmsk
needs that hook (each update is checked before it is averaged, per-site metrics and site
errors are recorded, every round is checkpointed, and the final model is evaluated on the
sites' test splits), so this loop calls the strategy's own ``configure_*``/``aggregate_*``
methods: the aggregation arithmetic stays Flower's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.exception import InconsistentMessageReplies

from client.trainer import build_screener
from server.report import RunRecorder
from server.strategy import build_strategy
from server.validation import check_update
from shared.config import FedmskConfig, to_yaml
from shared.messages import JOB_KEY, METRICS, RUN_ID_KEY, SPLIT_KEY, reply_site_name

log = logging.getLogger("fedmsk.server")


class Federation:
    """One federated run: global model, strategy, the run folder, and the site names seen."""

    def __init__(self, grid: Grid, cfg: FedmskConfig, run_dir: Path, on_progress=None) -> None:
        self.grid = grid
        self.cfg = cfg
        self.recorder = RunRecorder(run_dir, cfg)
        self.strategy = build_strategy(cfg)
        self.base_config = {JOB_KEY: to_yaml(cfg), RUN_ID_KEY: run_dir.name}
        self.site_names: dict[int, str] = {}
        self.on_progress = on_progress or (lambda text: None)

    def _site(self, msg: Message) -> str:
        node = msg.metadata.src_node_id
        if not msg.has_error():
            self.site_names[node] = reply_site_name(msg.content, f"node-{node}")
        return self.site_names.get(node, f"node-{node}")

    def _event(self, rnd: int, site: str, kind: str, reason: str) -> None:
        self.recorder.event(rnd, site, kind, reason)
        log.warning("round %d: %s: %s: %s", rnd, site, kind, reason)
        self.on_progress(f"round {rnd}/{self.cfg.rounds}: [yellow]{site}: {kind}[/]: {reason}")

    def _exchange(self, messages: Iterable[Message]) -> list[Message]:
        return list(self.grid.send_and_receive(list(messages), timeout=self.cfg.strategy.round_timeout_s))

    def train_round(self, rnd: int, arrays: ArrayRecord) -> ArrayRecord:
        msgs = self.strategy.configure_train(rnd, arrays, ConfigRecord(dict(self.base_config)), self.grid)
        accepted = []
        for reply in self._exchange(msgs):
            site = self._site(reply)
            if reply.has_error():
                self._event(rnd, site, "no update", reply.error.reason)
                continue
            verdict = check_update(arrays, reply.content, self.cfg.strategy.max_update_norm)
            if not verdict.ok:
                self._event(rnd, site, "update rejected", verdict.reason)
                continue
            metrics = dict(reply.content[METRICS]) | {"update_norm": verdict.update_norm}
            self.recorder.metrics(rnd, "train", site, metrics)
            self.on_progress(f"round {rnd}/{self.cfg.rounds}: {site} trained on {int(metrics['num-examples'])} patients, loss {metrics['train_loss']:.3f}")
            accepted.append(reply)
        if not accepted:
            self._event(rnd, "global", "round skipped", "no acceptable update; the global model is unchanged")
            return arrays
        try:
            new_arrays, agg = self.strategy.aggregate_train(rnd, accepted)
        except InconsistentMessageReplies as exc:
            self._event(rnd, "global", "round skipped", str(exc))
            return arrays
        if agg is not None:
            self.recorder.metrics(rnd, "train", "global", dict(agg))
        return new_arrays if new_arrays is not None else arrays

    def evaluate_round(self, rnd: int, arrays: ArrayRecord, split: str) -> dict[str, float] | None:
        config = ConfigRecord(dict(self.base_config) | {SPLIT_KEY: split})
        msgs = self.strategy.configure_evaluate(rnd, arrays, config, self.grid)
        ok = []
        for reply in self._exchange(msgs):
            site = self._site(reply)
            if reply.has_error():
                self._event(rnd, site, f"no {split} evaluation", reply.error.reason)
                continue
            self.recorder.metrics(rnd, "evaluate", site, dict(reply.content[METRICS]), split=split)
            ok.append(reply)
        if not ok:
            return None
        try:
            agg = self.strategy.aggregate_evaluate(rnd, ok)
        except InconsistentMessageReplies as exc:
            self._event(rnd, "global", f"{split} evaluation not pooled", str(exc))
            return None
        if agg is None:
            return None
        pooled = dict(agg)
        self.recorder.metrics(rnd, "evaluate", "global", pooled, split=split)
        self.on_progress(f"round {rnd}/{self.cfg.rounds}: {split} AUC over sites {pooled.get('auc', float('nan')):.3f}")
        return pooled

    def run(self) -> ArrayRecord:
        start = 1
        resumed = self.recorder.latest_checkpoint() if self.cfg.resume else None
        if resumed is not None:
            done, arrays = resumed
            start = done + 1
            self._event(done, "global", "resumed", f"continuing from the checkpoint of round {done}")
        else:
            arrays = ArrayRecord(build_screener(self.cfg).state_dict())
            noise = getattr(self.strategy, "noise_multiplier", None)
            if noise is not None:
                s = self.cfg.strategy
                self._event(0, "global", "client-level DP", f"epsilon {s.client_dp_epsilon} (delta {s.client_dp_delta}) over "
                            f"{self.cfg.rounds} rounds: updates clipped to {s.client_dp_clip}, noise multiplier {noise:.3f}")
            self.evaluate_round(0, arrays, "val")
        for rnd in range(start, self.cfg.rounds + 1):
            arrays = self.train_round(rnd, arrays)
            self.recorder.checkpoint(rnd, arrays)
            self.evaluate_round(rnd, arrays, "val")
        self.evaluate_round(self.cfg.rounds, arrays, "test")
        return arrays


def run_federation(grid: Grid, cfg: FedmskConfig, run_dir: Path, on_progress=None) -> tuple[ArrayRecord, RunRecorder]:
    """Run every round and write the run folder; returns the final arrays and the recorder."""
    import torch

    torch.manual_seed(cfg.seed)
    fed = Federation(grid, cfg, run_dir, on_progress)
    return fed.run(), fed.recorder
