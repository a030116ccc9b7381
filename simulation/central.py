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

    def evaluate_all(step: int, split: str) -> None:
        per_site = []
        for folder, _, datasets in federation:
            m = evaluate(screener, make_loader(datasets[split], 64, shuffle=False, seed=0), device)
            recorder.metrics(step, "evaluate", folder.name, m, split=split)
            per_site.append(m)
        pooled = pool_site_metrics(per_site)
        recorder.metrics(step, "evaluate", "global", pooled, split=split)
        console.print(f"  epoch {step * cfg.federation.local_epochs}: {split} AUC over sites {pooled['auc']:.3f}")

    evaluate_all(0, "val")
    for rnd in range(1, cfg.rounds + 1):
        loader = make_loader(pooled_train, cfg.federation.batch_size, shuffle=True, seed=cfg.seed * 1000 + rnd)
        result = train_local(screener, loader, cfg.federation, device)
        recorder.metrics(rnd, "train", "pooled", result.metrics())
        evaluate_all(rnd, "val")
    evaluate_all(cfg.rounds, "test")
    arrays = ArrayRecord({k: v.detach().cpu() for k, v in screener.state_dict().items()})
    extras = run_extras({"pooled_test": lambda: pooled_test_metrics(screener, cfg, federation, device, oracle=use_oracle)},
                        console)
    summary = recorder.finish(arrays, extras)
    console.print((run_dir / "summary.md").read_text())
    return summary
