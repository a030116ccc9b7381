"""Acceptance: 3 synthetic CT hospitals federated with the real ClientApp (in-process grid), per
task setting (Genant 0-3 and fracture yes/no); the global model must learn in a few rounds."""

from __future__ import annotations

import json

import pytest

from client.randomness import INSECURE_SEED_ENV
from server.federation import run_federation
from shared.config import compose
from simulation.generators import write_federation
from tests.inprocess_grid import InProcessGrid

# small enough for 2 CPU cores: 24^3 voxels at 3.3 mm (an 80 mm box), 30 patients a site
SMALL = ["model=fracture3d", "num_sites=3", "synth.patients_per_site=[30]", "synth.prevalence=[0.6]",
         "synth.image_size=48", "task.image_size=[24,24,24]", "task.spacing_mm=3.3", "task.augment=false",
         "rounds=4", "federation.local_epochs=3", "federation.batch_size=8", "federation.lr=0.005"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vf") / "sites"
    write_federation(compose(["task=vertebral_fracture", *SMALL, f"data_root={root}"]))
    return root


def _federate(root, tmp_path, monkeypatch, task: str) -> dict[int, dict]:
    monkeypatch.setenv(INSECURE_SEED_ENV, "vertebral-acceptance")  # repeatable site shuffles (tests only)
    cfg = compose([f"task={task}", *SMALL, f"data_root={root}", f"run_dir={tmp_path}"])
    run_federation(InProcessGrid({100 + i: {"partition-id": i} for i in range(3)}), cfg, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["site"] for r in rows if r["phase"] == "train" and r["site"] != "global"} == {"site_a", "site_b", "site_c"}
    return {r["round"]: r for r in rows if r["phase"] == "evaluate" and r["split"] == "val" and r["site"] == "global"}


def test_genant_grading_learns_across_three_ct_hospitals(root, tmp_path, monkeypatch):
    val = _federate(root, tmp_path, monkeypatch, "vertebral_fracture")
    assert set(val) == {0, 1, 2, 3, 4}
    # the round a run ships is the one chosen on validation (server.operating_point.select_round): the best
    # trained round must beat the untrained one; the last alone swings by 0.2 F1 on 3 small sites (CI saw 0.44 -> 0.22)
    best = max((1, 2, 3, 4), key=lambda r: val[r]["f1"])
    assert val[best]["f1"] > val[0]["f1"] + 0.15, {r: v["f1"] for r, v in val.items()}  # pooled macro-F1 over grades
    assert sum(val[best][f"cm_{g}{g}"] for g in range(4)) > sum(val[0][f"cm_{g}{g}"] for g in range(4))
    assert 0.0 <= val[4]["screen_auc"] <= 1.0 and "f1_class1" in val[4]


def test_binary_fracture_screening_learns_across_three_ct_hospitals(root, tmp_path, monkeypatch):
    val = _federate(root, tmp_path, monkeypatch, "vertebral_fracture_binary")
    assert val[4]["auc"] > val[0]["auc"] + 0.1, {r: v["auc"] for r, v in val.items()}
    balanced = {r: (v["sen"] + v["spc"]) / 2 for r, v in val.items()}
    assert balanced[4] > balanced[0] + 0.05, balanced
    assert "cm_00" not in val[4]  # the binary setting sends the screening counts only
