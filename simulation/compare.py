"""Runs compared on the same test patients (simulation / pooled baseline only): DeLong's test.

``fedmsk report <run> --compare <other run>`` scores both runs' final models on every site's
test patients pooled on the researcher's machine (what simulation.evaluation does for one run)
and tests the difference of the two AUCs with DeLong's test (shared.stats). Federated against
pooled is ``--compare runs/central-...``. A real federation cannot do this: the per-patient
scores it needs never leave the sites.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from shared.stats import delong_test


def pooled_test_scores(cfg, state) -> tuple[list[tuple[str, str]], np.ndarray, np.ndarray]:
    """(site, patient) keys, labels and positive-class scores of a model on the pooled test splits."""
    from client.site import list_sites
    from client.trainer import make_loader, predict
    from simulation.evaluation import load_federation, load_screener, split_patient_ids

    if not Path(cfg.data_root).is_dir() or not list_sites(cfg.data_root):
        raise FileNotFoundError(f"data_root {cfg.data_root} of the run is not on this machine: comparing runs needs every "
                                f"site's test patients (simulation or pooled baseline only)")
    screener = load_screener(cfg, state)
    keys, labels, scores = [], [], []
    for folder, site, datasets in load_federation(cfg):
        y, p, _ = predict(screener, make_loader(datasets["test"], 64, shuffle=False, seed=0), "cpu")
        keys += [(folder.name, pid) for pid in split_patient_ids(site, cfg, "test")]
        labels.append(y)
        scores.append(p[:, 1])
    return keys, np.concatenate(labels), np.concatenate(scores)


def compare_runs(run_a: str | Path, run_b: str | Path) -> dict[str, Any]:
    """DeLong's test of run_a's final model against run_b's on the same pooled test patients."""
    from server.export import load_run

    cfg_a, state_a, _ = load_run(Path(run_a))
    cfg_b, state_b, _ = load_run(Path(run_b))
    keys_a, y, s_a = pooled_test_scores(cfg_a, state_a)
    keys_b, y_b, s_b = pooled_test_scores(cfg_b, state_b)
    if keys_a != keys_b or not np.array_equal(y, y_b):
        raise ValueError(f"{run_a} and {run_b} were not tested on the same patients (different data_root, seed or split); "
                         f"DeLong's test compares two models on one set of patients")
    res = delong_test(y, s_a, s_b)
    low, high = res.ci()
    return {"run": str(run_a), "other": str(run_b), "other_model": cfg_b.model.name, "other_strategy": cfg_b.strategy.name,
            "n": len(keys_a), "n_pos": res.n_pos, "auc": res.auc_a, "auc_other": res.auc_b, "diff": res.diff,
            "ci_low": low, "ci_high": high, "p": res.p}
