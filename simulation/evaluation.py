"""Researcher-side evaluation of a finished model on every site's test split, on one machine.

Only for simulation and the pooled baseline, where all sites' data is on the researcher's
disk: it pools the test patients of all sites (which a real federation never could) and puts
the oracle AUC (the latent score the generator wrote, on the same patients) beside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from client.site import list_sites
from client.trainer import Screener, make_loader, predict
from shared.config import FedmskConfig
from shared.metrics import classification_metrics


def load_federation(cfg: FedmskConfig, sites: list[Path] | None = None):
    """(site folder, SiteData, datasets) for every site folder under cfg.data_root."""
    from shared.sitedata import load_site, make_datasets

    out = []
    for folder in sites or list_sites(cfg.data_root):
        site = load_site(folder, cfg.task)
        out.append((folder, site, make_datasets(site, cfg.task, cfg.seed, private=cfg.privacy.enabled)))  # as the sites scale
    return out


def split_patient_ids(site, cfg: FedmskConfig, split: str) -> list[str]:
    from shared.sitedata import split_indices

    idx = split_indices(site.labels, cfg.task.split, cfg.seed, groups=site.patient_ids)[split]
    return [site.patient_ids[i] for i in idx]


def pooled_test_metrics(screener: Screener, cfg: FedmskConfig, federation, device: str = "cpu") -> dict[str, float | None]:
    """Metrics of ``screener`` on all sites' test patients pooled, plus the oracle AUC."""
    from simulation.oracle import oracle_auc, oracle_grading

    labels, probs, keys = [], [], []
    for folder, site, datasets in federation:
        y, p, _ = predict(screener, make_loader(datasets["test"], 64, shuffle=False, seed=0), device)
        labels.append(y)
        probs.append(p)
        keys += [(folder.name, pid) for pid in split_patient_ids(site, cfg, "test")]
    metrics = classification_metrics(np.concatenate(labels), np.concatenate(probs))
    out: dict[str, float | None] = {k: metrics[k] for k in ("auc", "acc", "f1", "sen", "spc", "pre")}
    out["n"] = float(len(keys))
    oracle_file = Path(cfg.data_root) / "oracle.csv"
    out["oracle_auc"] = oracle_auc(cfg.data_root, keys) if oracle_file.is_file() else None
    if len(cfg.task.classes) > 2:  # graded task: per-grade F1 and the screening view, oracle beside
        out.update({k: v for k, v in metrics.items() if k.startswith("f1_class") or k in ("screen_auc", "screen_sen", "screen_spc")})
        out.update(oracle_grading(cfg.data_root, keys) if oracle_file.is_file() else {})
    return out


def load_screener(cfg: FedmskConfig, state: dict[str, torch.Tensor]) -> Screener:
    from client.trainer import build_screener

    screener = build_screener(cfg)
    screener.load_state_dict(state)
    return screener
