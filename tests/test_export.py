"""`fedmsk export` (safetensors + ONNX + model card) and `fedmsk predict` at a hospital."""

import csv
import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from cli.main import main
from client.trainer import build_screener
from server.export import ScoringModel, export_run, load_export
from server.report import RunRecorder
from shared.clinical import feature_names
from shared.config import compose
from simulation.synth import write_federation

SMALL = ["model.width=8", "model.embed_dim=32", "model.proj_dim=16", "task.image_size=[32,32]"]


def _finished_run(tmp_path, overrides):
    """A run folder as RunRecorder.finish leaves it, with weights moved off their initial values."""
    run_dir = tmp_path / "run"
    cfg = compose(SMALL + overrides + [f"run_dir={run_dir}"])
    torch.manual_seed(0)
    screener = build_screener(cfg)
    with torch.no_grad():
        for p in screener.parameters():
            p.add_(0.1 * torch.randn_like(p))
    RunRecorder(run_dir, cfg).finish(ArrayRecord(screener.state_dict()))
    return run_dir, cfg, screener


@pytest.mark.parametrize("model", ["mmcl", "late_fusion", "clinical_only"])
def test_onnx_export_gives_the_torch_models_outputs(model, tmp_path):
    import onnxruntime as ort
    from safetensors.torch import load_file

    run_dir, cfg, screener = _finished_run(tmp_path, [f"model={model}"])
    out = export_run(run_dir)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.onnx", "model.safetensors",
                                                      "model_card.json", "model_card.md"]
    gen = torch.Generator().manual_seed(1)
    n_features = len(feature_names(cfg.task))
    image, clinical = torch.rand(5, 1, 32, 32, generator=gen), torch.randn(5, n_features, generator=gen)  # not the export's batch
    with torch.no_grad():
        expected = ScoringModel(screener.net).eval()(image, clinical).numpy()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"image": image.numpy(), "clinical": clinical.numpy()}
    got = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert expected.std() > 1e-3  # the batch's outputs differ: the comparison is not between constants
    weights = load_file(str(out / "model.safetensors"))
    for key, value in screener.net.state_dict().items():
        assert torch.equal(weights[f"net.{key}"], value)
    card = json.loads((out / "model_card.json").read_text())
    assert card["task"]["name"] == "sarcopenia" and card["model"] == model
    assert card["code"]["git_commit"] and len(card["code"]["git_commit"]) == 40
    assert card["inputs"]["onnx_inputs"] == [i.name for i in session.get_inputs()]
    assert card["pretraining"]["source"].startswith("random")


def test_export_of_an_unfinished_run_says_what_is_missing(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["export", str(tmp_path / "run")]) == 2
    assert "final_model.pt" in capsys.readouterr().err


def test_predict_scores_new_patients_and_lists_unusable_records(tmp_path):
    root = tmp_path / "sites"
    write_federation(compose(SMALL + ["num_sites=1", "synth.patients_per_site=[30]", "synth.image_size=64",
                                      f"data_root={root}"]))
    site = root / "site_a"
    rows = list(csv.DictReader((site / "clinical.csv").open()))
    for row in rows[:6]:
        row["sarcopenia"] = ""  # new patients: no label yet
    rows.append(dict(rows[-1], patient_id="NOIMAGE1"))  # a clinical row without any DICOM
    with (site / "clinical.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    run_dir, cfg, _ = _finished_run(tmp_path, ["model=mmcl"])
    export = export_run(run_dir)
    assert main(["predict", str(export), str(site), "--device", "cpu"]) == 0
    with (site / "fedmsk-predictions.csv").open() as fh:
        scored = list(csv.DictReader(fh))
    with (site / "fedmsk-predict-report.csv").open() as fh:
        report = list(csv.DictReader(fh))
    assert any(r["record"] == "NOIMAGE1" and r["reason"] == "patient_without_image" for r in report)
    ids = {r["patient_id"] for r in scored}
    unusable = {r["record"] for r in report if r["used"] == "no"}  # synth writes a few broken records too
    unlabelled = {r["patient_id"] for r in rows[:6]} - unusable
    assert "NOIMAGE1" not in ids and len(unlabelled) >= 4 and unlabelled <= ids  # unlabelled patients are scored
    assert {r["patient_id"] for r in scored if r["label"] == ""} == unlabelled
    assert ids.isdisjoint(unusable)
    p = np.array([[float(r[k]) for k in r if k.startswith("p_")] for r in scored])
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert p[:, 1].std() > 1e-4  # the scores depend on the patient
    _, model, _ = load_export(export)
    assert isinstance(model, ScoringModel)
