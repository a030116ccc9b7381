"""Researcher-side evaluation of a finished model on every site's test split, on one machine.

Only for simulation and the pooled baseline, where all sites' data is on the researcher's
disk: it pools the test patients of all sites (which a real federation never could) and puts
the oracle AUC (the latent score the generator wrote, on the same patients) beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

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


def pooled_test_metrics(screener: Screener, cfg: FedmskConfig, federation, device: str = "cpu",
                        oracle: bool | None = None, threshold: float = 0.5) -> dict[str, float | None]:
    """Metrics of ``screener`` on all sites' test patients pooled, plus the oracle AUC.

    ``oracle``: whether to read ``oracle.csv`` (``check_side_files`` decides at start); None: if it exists.
    ``threshold``: the operating threshold the run chose on validation (binary tasks), so the
    pooled ACC/F1/SEN/SPC/PRE are those of the model as the run would use it.
    """
    from simulation.oracle import oracle_auc, oracle_grading

    labels, probs, keys = [], [], []
    for folder, site, datasets in federation:
        y, p, _ = predict(screener, make_loader(datasets["test"], 64, shuffle=False, seed=0), device)
        labels.append(y)
        probs.append(p)
        keys += [(folder.name, pid) for pid in split_patient_ids(site, cfg, "test")]
    metrics = classification_metrics(np.concatenate(labels), np.concatenate(probs), threshold=threshold)
    out: dict[str, float | None] = {k: metrics[k] for k in ("auc", "acc", "f1", "sen", "spc", "pre")}
    out["threshold"] = threshold
    out["n"] = float(len(keys))
    use_oracle = (Path(cfg.data_root) / "oracle.csv").is_file() if oracle is None else oracle
    out["oracle_auc"] = oracle_auc(cfg.data_root, keys) if use_oracle else None
    if len(cfg.task.classes) > 2:  # graded task: per-grade F1 and the screening view, oracle beside
        out.update({k: v for k, v in metrics.items() if k.startswith("f1_class") or k in ("screen_auc", "screen_sen", "screen_spc")})
        out.update(oracle_grading(cfg.data_root, keys) if use_oracle else {})
    return out


def check_side_files(cfg: FedmskConfig, sites: list[Path], console: Console) -> bool:
    """Validate optional files beside the site folders at start; True when the oracle can be used.

    A file that is not fedmsk's (a research group's own oracle.csv) is said now, and the run goes
    on without what it would have added.
    """
    from shared.clinical import read_table
    from simulation.oracle import oracle_problem

    if not (Path(cfg.data_root) / "oracle.csv").is_file():
        return False
    patients = [(s.name, pid) for s in sites for pid in read_table(s / "clinical.csv", cfg.task).rows]  # no images read
    problem = oracle_problem(cfg.data_root, patients)
    if problem:
        console.print(f"[yellow]oracle.csv not used[/]: {problem}; the run goes on without the oracle AUC", highlight=False)
    return problem is None


def run_extras(extras: dict[str, Callable[[], Any]], console: Console) -> dict[str, Any]:
    """Run the reporting extras of a finished run; one that fails is skipped and named, never the run.

    The model, metrics and summary are written whatever an extra does; ``summary.json`` lists what
    was skipped and why under ``skipped``, and the verb still exits 0 (the run itself completed).
    """
    out: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name, compute in extras.items():
        try:
            out[name] = compute()
        except Exception as exc:  # noqa: BLE001 -- a report step must not lose a finished run
            skipped[name] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            console.print(f"[yellow]skipped {name}[/]: {skipped[name]}; weights, metrics and summary are written",
                          highlight=False)
    if skipped:
        out["skipped"] = skipped
    return out


def load_screener(cfg: FedmskConfig, state: dict[str, torch.Tensor]) -> Screener:
    from client.trainer import build_screener

    screener = build_screener(cfg)
    screener.load_state_dict(state)
    return screener
