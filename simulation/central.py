"""`fedmsk central`: the pooled baseline. The same model, loss and local-training loop,
trained on all sites' training splits pooled (each site keeps its own split and its own
clinical scaling, exactly as in the federation), evaluated on the same validation and test
patients, into a run folder of the same format, so federated and pooled runs compare.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord
from rich.console import Console
from torch.utils.data import ConcatDataset

from client.trainer import build_screener, evaluate, make_loader, train_local
from server.app import default_run_dir
from server.operating_point import at_operating_point, select_round
from server.report import RunRecorder
from server.strategy import pool_site_metrics
from shared.config import FedmskConfig, resolve_device
from simulation.evaluation import check_side_files, load_federation, pooled_test_metrics, run_extras


def central(cfg: FedmskConfig, console: Console | None = None) -> dict:
    console = console or Console()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, cfg.federation.torch_threads))  # as each simulated site does
    device = resolve_device(cfg.device)
    federation = load_federation(cfg)
    use_oracle = check_side_files(cfg, [folder for folder, _, _ in federation], console)
    run_dir = default_run_dir(cfg, "central").resolve()
    recorder = RunRecorder(run_dir, cfg)
    pooled_train = ConcatDataset([d["train"] for _, _, d in federation])
    epochs = cfg.rounds * cfg.federation.local_epochs
    console.print(
        f"[bold]fedmsk central[/]: {len(federation)} sites pooled ({len(pooled_train)} training patients), "
        f"model {cfg.model.name}, {epochs} epochs -> {run_dir}"
    )
    screener = build_screener(cfg)

    def evaluate_all(step: int, split: str, threshold: float | None = None, extra: dict | None = None) -> dict:
        """Every site's metrics and the pooled ones at the operating point, exactly as the
        federation's coordinator computes them (server.operating_point): on validation the
        threshold is chosen on the pooled score histograms, on test the selected epoch's is used."""
        per_site = [evaluate(screener, make_loader(d[split], 64, shuffle=False, seed=0), device) for _, _, d in federation]
        rows, from_hist = at_operating_point(per_site, cfg.task, threshold)
        for (folder, _, _), row in zip(federation, rows):
            recorder.metrics(step, "evaluate", folder.name, row, split=split)
        pooled = pool_site_metrics(rows)
        if from_hist:
            pooled |= {"auc_site_mean": pooled.get("auc", float("nan"))} | from_hist
        pooled |= extra or {}
        recorder.metrics(step, "evaluate", "global", pooled, split=split)
        console.print(f"  epoch {step * cfg.federation.local_epochs}: {split} AUC {pooled['auc']:.3f}")
        return pooled

    evaluate_all(0, "val")
    best_state, best = None, None
    for rnd in range(1, cfg.rounds + 1):
        loader = make_loader(pooled_train, cfg.federation.batch_size, shuffle=True, seed=cfg.seed * 1000 + rnd)
        result = train_local(screener, loader, cfg.federation, device)
        recorder.metrics(rnd, "train", "pooled", result.metrics())
        evaluate_all(rnd, "val")
        choice = select_round(recorder.select(phase="evaluate", split="val", site="global"))
        if choice is not None and choice[0] == rnd:  # early stopping on validation, as the federation selects rounds
            best = choice
            best_state = {k: v.detach().clone() for k, v in screener.state_dict().items()}
    threshold = None
    if best is not None:
        screener.load_state_dict(best_state)
        threshold = best[2]
        console.print(f"  epoch {best[0] * cfg.federation.local_epochs} has the best pooled validation AUC ({best[1]:.3f}); "
                      f"its model is the final one, threshold {threshold:.2f}")
    evaluate_all(cfg.rounds, "test", threshold, {"selected_round": best[0]} if best is not None else None)
    arrays = ArrayRecord({k: v.detach().cpu() for k, v in screener.state_dict().items()})
    extras = run_extras({"pooled_test": lambda: pooled_test_metrics(screener, cfg, federation, device, oracle=use_oracle,
                                                                    threshold=threshold if threshold is not None else 0.5)},
                        console)
    summary = recorder.finish(arrays, extras)
    console.print((run_dir / "summary.md").read_text())
    return summary
