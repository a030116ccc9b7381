"""`fedmsk pretrain-public`: train the image and clinical encoders centrally on data the consortium
treats as public, for DP fine-tuning at the hospitals.

DP-SGD's noise costs least when the private data only has to adjust a model that already
sees: weights pretrained on public data (here synthetic hospitals, or any folder of site
folders the coordinator names with ``data_root=``) and then fine-tuned under DP, with
``model.finetune=heads`` or ``norm_heads`` if the encoders should stay as they are. This is the
public, centralised route; federated self-supervised pretraining on the hospitals' own
unlabelled data is a different thing (issue 14's future ``fedmsk pretrain``), hence the name.

The run folder gets ``encoder.pt`` (the whole network's state_dict, loadable by
``model.pretrained_path``), ``encoder_card.json`` (provenance: the data folder, its sites and
patient counts, the config, the SHA-256 of the weights, and the statement that the data are
public) and the usual metrics. A federated run started from it records that card in its model
card (``pretrained`` entry), and each site's privacy ledger records the weights' hash in the run's
noise plan, beside the statement that the private data were that site's training split.

The clinical columns are scaled from the task's reference values (as every DP site scales them),
so the pretrained clinical encoder sees the same inputs at the hospitals.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from torch.utils.data import ConcatDataset

from client.site import list_sites
from client.trainer import build_screener, evaluate, make_loader, train_local
from server.app import default_run_dir
from shared.atomic import atomic_write_text
from shared.config import FedmskConfig, resolve_device, to_yaml
from shared.provenance import CARD, sha256_of

WEIGHTS = "encoder.pt"


def pretrain_public(cfg: FedmskConfig, console: Console | None = None) -> Path:
    """Train cfg.model on every site folder under cfg.data_root pooled; write encoder.pt + its card."""
    from shared.sitedata import load_site, make_datasets

    console = console or Console()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, cfg.federation.torch_threads))
    device = resolve_device(cfg.device)
    run_dir = default_run_dir(cfg, "pretrain-public").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    sites = []
    for folder in list_sites(cfg.data_root):
        site = load_site(folder, cfg.task)
        sites.append((folder, make_datasets(site, cfg.task, cfg.seed, private=True)))  # reference scaling, as DP sites
    train = ConcatDataset([d["train"] for _, d in sites] + [d["val"] for _, d in sites])  # public: no split is private
    if len(train) == 0:
        raise RuntimeError(f"data_root {cfg.data_root}: no usable labelled patient to pretrain on; run `fedmsk check`")
    cfg = replace(cfg, model=replace(cfg.model, finetune="all", pretrained_path=None))
    screener = build_screener(cfg)
    epochs = cfg.rounds * cfg.federation.local_epochs
    console.print(f"[bold]fedmsk pretrain-public[/]: {len(sites)} public sites ({len(train)} patients), model "
                  f"{cfg.model.name}, {epochs} epochs -> {run_dir}")
    for epoch in range(1, epochs + 1):
        result = train_local(screener, make_loader(train, cfg.federation.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch),
                             cfg.federation, device, epochs=1)
        console.print(f"  epoch {epoch}: train loss {result.train_loss:.3f}")
    test = ConcatDataset([d["test"] for _, d in sites])
    metrics = evaluate(screener, make_loader(test, 64, shuffle=False, seed=0), device)
    weights = run_dir / WEIGHTS
    torch.save({k: v.detach().cpu() for k, v in screener.net.state_dict().items()}, weights)
    card = {
        "weights": WEIGHTS,
        "sha256": sha256_of(weights),
        "data": "public: the consortium treats these sites as public; no hospital's private data",
        "data_root": str(Path(cfg.data_root).resolve()),
        "sites": {folder.name: {"patients": len(d["train"]) + len(d["val"]) + len(d["test"])} for folder, d in sites},
        "trained_on": len(train),
        "epochs": epochs,
        "model": cfg.model.name,
        "public_test_auc": metrics.get("auc"),
        "clinical_scaling": "task reference values (ClinicalScaler.from_reference)",
    }
    atomic_write_text(run_dir / CARD, json.dumps(card, indent=2))
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    console.print(f"wrote {weights} (public test AUC {metrics.get('auc', float('nan')):.3f}); start a run from it with\n"
                  f"  model.pretrained_path={weights} [model.finetune=heads|norm_heads]")
    return weights
