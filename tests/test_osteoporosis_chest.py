"""Osteoporosis from chest X-ray: the synthetic hospitals, `fedmsk check` on the risk-factor columns,
a small federation that learns, and per-sample DP gradients of the wavelet fusion model.
(McNemar against a published table: tests/test_stats.py.)"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from opacus import GradSampleModule
from rich.console import Console

from client.check import check_site
from client.randomness import INSECURE_SEED_ENV
from server.federation import run_federation
from shared.clinical import feature_names
from shared.config import compose
from shared.models import build_model
from simulation import synth_chest
from simulation.evaluation import load_federation, load_screener, pooled_test_metrics
from simulation.generators import write_federation
from tests.inprocess_grid import InProcessGrid

TASK = ["task=osteoporosis_chest", "model=wavelet_fusion"]
# strong signal (the table and the image each explain more of the T-score), tiny images, 2 sites
STRONG = ["num_sites=2", "synth.patients_per_site=[70]", "synth.prevalence=[0.4]", "synth.image_size=32",
          "synth.image_signal=2.0", "synth.clinical_signal=2.0", "task.image_size=[32,32]", "task.augment=false",
          "rounds=3", "federation.local_epochs=3", "federation.batch_size=16", "federation.lr=0.005",
          "model.width=8", "model.embed_dim=32", "model.clinical_hidden=16"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chest") / "sites"
    write_federation(compose([*TASK, *STRONG, f"data_root={root}"]))
    return root


def test_generator_writes_chest_dicom_and_every_declared_column(root: Path) -> None:
    cfg = compose([*TASK, *STRONG, f"data_root={root}"])
    rows = list(csv.DictReader((root / "site_a" / "clinical.csv").open()))
    declared = [c.name for c in cfg.task.columns]
    assert set(declared) | {"patient_id", "osteoporosis"} == set(rows[0])
    files = sorted((root / "site_a" / "images").rglob("*.dcm"))
    assert len(files) == len(rows)  # one patient has no image, one image has no row
    ds = pydicom.dcmread(files[0])
    assert (ds.BodyPartExamined, ds.ViewPosition) == ("CHEST", "PA")
    assert ds.pixel_array.shape == (32, 32)
    linked = {pydicom.dcmread(f, stop_before_pixels=True).PatientID for f in files}
    assert len(linked & {r["patient_id"] for r in rows}) == len(rows) - 1
    # the label is the WHO definition applied to the measured T-score the site writes
    assert all(int(r["osteoporosis"]) == (float(r["t_score"]) <= -2.5) for r in rows)
    oracle = list(csv.DictReader((root / "oracle.csv").open()))
    assert {"latent_score", "t_score_true"} <= set(oracle[0])


def test_the_latent_t_score_follows_the_risk_factors_and_shows_in_the_bones() -> None:
    spec = synth_chest.site_specs(compose([*TASK, "num_sites=1"]))[0]
    pop = synth_chest.sample_population(spec, 4000, np.random.default_rng(0))
    assert pop.t_true[pop.glucocorticoids == 1].mean() < pop.t_true[pop.glucocorticoids == 0].mean() - 0.3
    assert pop.t_true[pop.female == 1].mean() < pop.t_true[pop.female == 0].mean() - 0.4
    assert np.corrcoef(pop.age, pop.t_true)[0, 1] < -0.2
    assert pop.t_true[pop.prior_fracture == 1].mean() < pop.t_true[pop.prior_fracture == 0].mean()  # a consequence
    assert abs(pop.label.mean() - spec.prevalence) < 0.01

    def spine(density: float) -> tuple[float, float]:
        p = synth_chest.ChestParams(density=density, soft_radius=40.0, bone_scale=1.0)
        img = synth_chest.render_chest(p, 128, 1.0, np.random.default_rng(1))
        col = img[10:120, 60:68]  # the vertebral column
        return float(col.mean()), float(np.abs(np.diff(col, axis=1)).mean())

    dense, porous = spine(1.3), spine(0.7)
    assert dense[0] > porous[0] + 0.05  # brighter bone where density is high


def test_check_reports_a_bad_risk_factor_spelling_naming_column_and_spellings(root: Path) -> None:
    task = compose([*TASK, *STRONG, f"data_root={root}"]).task
    result = check_site(root / "site_b", task, Console(quiet=True))
    assert result.ok
    report = list(csv.DictReader(result.report.open()))
    bad = [r for r in report if r["reason"] == "unknown_category"]
    assert len(bad) == 1 and f"smoking='{synth_chest.BAD_SPELLING}'" in bad[0]["detail"]
    for spelling in ("never", "former", "current", "ex-smoker"):
        assert spelling in bad[0]["detail"]
    # the site's own spellings (Y/N, non-smoker/ex-smoker/smoker) are read, not reported
    assert result.summary["usable_patients"] == 70 - 3  # age 150, the bad spelling, the patient without an image
    # the model's clinical inputs: yes/no columns one value, smoking one-hot, a missing indicator each
    names = feature_names(task)
    assert {"smoking=0", "smoking=1", "smoking=2", "prior_fracture", "alcohol_missing"} <= set(names)
    assert "t_score" not in names and "t_score_missing" not in names  # the label's source is never an input


def test_a_small_chest_federation_learns(root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(INSECURE_SEED_ENV, "chest-acceptance")  # repeatable site shuffles (tests only)
    cfg = compose([*TASK, *STRONG, f"data_root={root}", f"run_dir={tmp_path}"])
    arrays, _ = run_federation(InProcessGrid({100 + i: {"partition-id": i} for i in range(2)}), cfg, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["site"] for r in rows if r["phase"] == "train" and r["site"] != "global"} == {"site_a", "site_b"}
    metrics = pooled_test_metrics(load_screener(cfg, arrays.to_torch_state_dict()), cfg, load_federation(cfg))
    assert metrics["auc"] > 0.75, metrics
    assert metrics["oracle_auc"] > metrics["auc"] - 0.05


def test_wavelet_fusion_per_sample_gradients_are_each_patients_own() -> None:
    """Opacus' per-sample gradient of every parameter (backbone, sub-band and region attention,
    clinical model, the probability mix) equals the gradient of that patient's loss alone."""
    # no dropout, so one patient's pass is the same alone or in the batch (Opacus hooks only train mode)
    cfg = compose([*TASK, "model.width=8", "model.embed_dim=16", "model.dropout=0.0", "task.image_size=[32,32]"])
    net = build_model(cfg).train()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # off the init: the mix weight alpha starts at 0
    image, clinical = torch.rand(4, 1, 32, 32), torch.randn(4, len(feature_names(cfg.task)))
    label = torch.tensor([0, 1, 1, 0])
    gsm = GradSampleModule(net, loss_reduction="sum")
    torch.nn.functional.cross_entropy(gsm(image, clinical)["logits"], label, reduction="sum").backward()
    per_sample = {n: p.grad_sample.clone() for n, p in net.named_parameters()}
    assert "mix.alpha" in per_sample and "subbands.score.0.weight" in per_sample and "regions.score.conv.weight" in per_sample
    gsm._close()
    for i in range(4):
        net.zero_grad()
        torch.nn.functional.cross_entropy(net(image[i:i + 1], clinical[i:i + 1])["logits"], label[i:i + 1]).backward()
        for n, p in net.named_parameters():
            assert torch.allclose(per_sample[n][i], p.grad, atol=1e-5, rtol=1e-4), n
