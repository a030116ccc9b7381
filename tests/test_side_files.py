"""A finished run is never lost to a reporting step, and optional side files are checked at start.

`fedmsk central` and `fedmsk simulate` share the two pieces under test (simulation/evaluation.py):
``check_side_files`` (a research group's own oracle.csv is said at start and the run goes on
without the oracle) and ``run_extras`` (an extra that fails is skipped and named; the weights,
metrics and summary are written and the verb exits 0). `central` is the cheap way to run them
end to end (no Ray).
"""

from __future__ import annotations

import json

import pytest

import simulation.central
from cli.main import main as fedmsk
from shared.config import compose
from simulation.synth import write_federation

SMALL = ["num_sites=2", "synth.patients_per_site=[36,36]", "synth.prevalence=[0.4,0.4]", "synth.missing_rate=[0,0]",
         "synth.image_size=32", "task.image_size=[16,16]", "model=logreg", "rounds=1", "task.min_usable=5"]


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("side") / "fed"
    write_federation(compose([*SMALL, f"data_root={root}"]))
    return root


def _central(root, run_dir, capsys) -> tuple[int, str, dict]:
    code = fedmsk(["central", *SMALL, f"data_root={root}", f"run_dir={run_dir}"])
    out = " ".join(capsys.readouterr().out.split())
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    return code, out, summary


def test_a_foreign_oracle_is_said_at_start_and_the_run_finishes_without_it(federation, tmp_path, capsys):
    (federation / "oracle.csv").write_text("subject,risk\nA,0.3\n")  # a research group's own file of that name
    code, out, summary = _central(federation, tmp_path / "run", capsys)
    assert code == 0 and (tmp_path / "run" / "final_model.pt").is_file()
    assert "oracle.csv not used" in out and "['subject', 'risk']" in out
    assert out.index("oracle.csv not used") < out.index("epoch 0")  # before any training
    assert summary["pooled_test"]["oracle_auc"] is None and summary["pooled_test"]["auc"] is not None


def test_a_failing_extra_is_skipped_and_named_the_run_folder_is_written(federation, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("latent_score")

    monkeypatch.setattr(simulation.central, "pooled_test_metrics", broken)  # as a stale oracle.csv made it fail
    code, out, summary = _central(federation, tmp_path / "run", capsys)
    assert code == 0  # the run itself completed
    for name in ("final_model.pt", "model_card.json", "summary.md", "metrics.jsonl"):
        assert (tmp_path / "run" / name).is_file(), name
    assert summary["skipped"] == {"pooled_test": "KeyError: 'latent_score'"}
    assert "skipped pooled_test: KeyError: 'latent_score'" in out


def test_an_oracle_of_another_federation_is_refused_at_start(federation, tmp_path):
    from rich.console import Console

    from client.site import list_sites
    from simulation.evaluation import check_side_files

    cfg = compose([*SMALL, f"data_root={federation}"])
    write_federation(compose([*SMALL, f"data_root={tmp_path}", "seed=5", "synth.patients_per_site=[10,10]"]))
    (federation / "oracle.csv").write_bytes((tmp_path / "oracle.csv").read_bytes())  # same columns, other patients
    console = Console(record=True, width=200)
    assert not check_side_files(cfg, list_sites(federation), console)
    assert "belongs to another federation" in console.export_text()
    write_federation(compose([*SMALL, f"data_root={federation}"]))  # its own oracle back: used
    assert check_side_files(cfg, list_sites(federation), Console(file=None))
