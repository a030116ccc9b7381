"""The federation's operating point, with the real ClientApp in-process: pooled ROC from the
sites' score histograms, threshold chosen on validation, best validation round as final model."""

import json

import numpy as np
import pytest
import torch

from client.trainer import make_loader, predict
from server.federation import run_federation
from shared.config import compose
from simulation.evaluation import load_federation, load_screener
from simulation.synth import write_federation
from tests.inprocess_grid import InProcessGrid

SMALL = [
    "num_sites=3", "synth.patients_per_site=[110,90,80]", "synth.image_size=32", "task.image_size=[16,16]",
    "task.split.val=0.3", "task.split.test=0.4", "rounds=4", "federation.local_epochs=2", "model=logreg",
    "federation.lr=0.05", "task.augment=false",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("op")
    cfg = compose(SMALL + [f"data_root={base / 'sites'}", f"run_dir={base / 'run'}"])
    write_federation(cfg)
    arrays, _ = run_federation(InProcessGrid({100 + i: {"partition-id": i} for i in range(3)}), cfg, base / "run")
    rows = [json.loads(x) for x in (base / "run" / "metrics.jsonl").read_text().splitlines()]
    return cfg, arrays, rows, base / "run"


def _global(rows, split):
    return [r for r in rows if r["phase"] == "evaluate" and r["split"] == split and r["site"] == "global"]


def test_pooled_auc_and_counts_from_histograms_match_the_pooled_test_patients(run):
    cfg, arrays, rows, _ = run
    test = _global(rows, "test")[-1]
    screener = load_screener(cfg, arrays.to_torch_state_dict())
    labels, scores = [], []
    for _, _, datasets in load_federation(cfg):
        y, p, _ = predict(screener, make_loader(datasets["test"], 64, shuffle=False, seed=0), "cpu")
        labels.append(y)
        scores.append(p[:, 1])
    y, s = np.concatenate(labels), np.concatenate(scores)
    from sklearn.metrics import roc_auc_score

    assert abs(test["auc"] - roc_auc_score(y, s)) < 0.005
    t = test["threshold"]
    pred = s >= t
    assert (test["tp"], test["fp"]) == (float((pred & (y == 1)).sum()), float((pred & (y == 0)).sum()))
    assert (test["tn"], test["fn"]) == (float((~pred & (y == 0)).sum()), float((~pred & (y == 1)).sum()))
    sites = [r for r in rows if r["phase"] == "evaluate" and r["split"] == "test" and r["site"] != "global"]
    assert all(r["threshold"] == t for r in sites)  # each site's own metrics at the same operating point
    assert sum(r["tp"] for r in sites) == test["tp"]


def test_threshold_is_chosen_on_validation_and_the_best_round_is_the_final_model(run):
    cfg, arrays, rows, run_dir = run
    val = {r["round"]: r for r in _global(rows, "val") if r["round"] >= 1}
    best = max(val, key=lambda k: val[k]["auc"])
    test = _global(rows, "test")[-1]
    assert test["selected_round"] == best
    assert test["threshold"] == val[best]["threshold"]  # chosen on validation, never on test
    assert 0.0 < test["threshold"] < 1.0
    saved = torch.load(run_dir / "checkpoints" / f"round_{best:04d}.pt", weights_only=True)
    final = arrays.to_torch_state_dict()
    assert all(torch.equal(saved[k], final[k]) for k in saved)
