"""End to end: synthetic hospitals -> Flower simulation -> run folder, and the pooled baseline."""

import json
import shutil

import pytest

from shared.config import compose
from simulation.central import central
from simulation.runner import simulate
from simulation.synth import write_federation

TINY = [
    "num_sites=3",
    "synth.patients_per_site=[90,70,60]",
    "synth.image_size=64",
    "task.image_size=[32,32]",
    "rounds=2",
    "federation.local_epochs=3",
    "model.width=8",
    "model.embed_dim=32",
    "model.proj_dim=16",
    "strategy.min_train_nodes=2",
    "strategy.min_evaluate_nodes=2",
    "strategy.min_available_nodes=2",
]


@pytest.fixture(scope="module")
def federation_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed") / "sites"
    write_federation(compose(TINY + [f"data_root={root}"]))
    # a fourth hospital whose export is unusable: its ClientApp fails, the rounds go on
    bad = root / "site_z_broken"
    bad.mkdir()
    (bad / "clinical.csv").write_text("patient_id,age\nX1,notanumber\n")
    return root


def test_simulation_learns_and_survives_a_broken_site(federation_root, tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose(TINY + [f"data_root={federation_root}", f"run_dir={run_dir}"])
    summary = simulate(cfg)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val_global = {r["round"]: r["auc"] for r in rows if r["phase"] == "evaluate" and r["split"] == "val" and r["site"] == "global"}
    assert set(val_global) == {0, 1, 2}
    assert val_global[2] > val_global[0] + 0.1, val_global
    trained = {r["site"] for r in rows if r["phase"] == "train" and r["site"] != "global"}
    assert trained == {"site_a", "site_b", "site_c"}
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    # the broken site, logged by its folder's name (its error replies carry none), not fatal
    assert {e["site"] for e in events if e["event"] == "no update"} == {"site_z_broken"}, events
    assert (run_dir / "final_model.pt").is_file() and (run_dir / "checkpoints" / "round_0002.pt").is_file()
    assert summary["test_global"]["auc"] is not None
    assert 0.5 < summary["pooled_test"]["oracle_auc"] <= 1.0
    # the researcher-side pooled test uses the operating threshold the coordinator chose on validation
    assert summary["pooled_test"]["threshold"] == pytest.approx(summary["operating_point"]["threshold"])


def test_pooled_baseline_writes_the_same_run_format(federation_root, tmp_path):
    good = tmp_path / "good"
    shutil.copytree(federation_root, good, ignore=shutil.ignore_patterns("site_z_broken"))
    run_dir = tmp_path / "central"
    summary = central(compose(TINY + [f"data_root={good}", f"run_dir={run_dir}"]))
    assert set(summary["test_per_site"]) == {"site_a", "site_b", "site_c"}
    val = [a for _, a in summary["val_auc_by_round"]]
    assert val[-1] > val[0] + 0.1
    # the final model is the epoch with the best pooled validation AUC, and the researcher-side
    # pooled test is scored at the threshold chosen on validation, as the federation does
    test_global = summary["operating_point"]
    assert test_global["selected_round"] == max(range(1, 3), key=lambda r: dict(summary["val_auc_by_round"])[r])
    assert summary["pooled_test"]["threshold"] == pytest.approx(test_global["threshold"])
