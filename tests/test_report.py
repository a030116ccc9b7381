"""`fedmsk report`: an offline HTML + Markdown page whose every plot exists, ROC from histograms."""

import math
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from flwr.app import ArrayRecord
from sklearn.metrics import roc_auc_score

from cli.main import main
from server.html_report import histograms, roc_points
from server.report import RunRecorder
from shared.config import compose

BINS = 50


def _hist(labels, scores):
    b = np.clip((scores * BINS).astype(int), 0, BINS - 1)
    neg, pos = np.bincount(b[labels == 0], minlength=BINS), np.bincount(b[labels == 1], minlength=BINS)
    return {f"hist_neg_{k:02d}": float(v) for k, v in enumerate(neg)} | {f"hist_pos_{k:02d}": float(v) for k, v in enumerate(pos)}


def _eval_row(rng, n, with_hist=True):
    labels = (rng.random(n) < 0.35).astype(int)
    scores = np.clip(0.35 + 0.3 * labels + rng.normal(0, 0.2, n), 0, 0.999)
    tp = float(((scores >= 0.5) & (labels == 1)).sum())
    fp = float(((scores >= 0.5) & (labels == 0)).sum())
    row = {"num-examples": n, "loss": 0.6, "auc": roc_auc_score(labels, scores), "acc": 0.7, "f1": 0.6, "sen": 0.6,
           "spc": 0.8, "pre": 0.6, "tp": tp, "fp": fp, "tn": float((labels == 0).sum()) - fp, "fn": float(labels.sum()) - tp}
    return (row | _hist(labels, scores)) if with_hist else row


def _run(tmp_path, with_hist=True):
    run_dir = tmp_path / "run"
    cfg = compose(["model=logreg", "rounds=3", f"run_dir={run_dir}"])
    rec = RunRecorder(run_dir, cfg)
    rng = np.random.default_rng(0)
    for rnd in range(0, 4):
        for i, site in enumerate(["site_a", "site_b", "site_c"]):
            if rnd:
                dp = site == "site_c"
                rec.metrics(rnd, "train", site, {"num-examples": 40 + 10 * i, "train_loss": 1 / rnd, "train_acc": 0.7,
                                                 "steps": 5, "dp": float(dp), "epsilon": 1.5 * rnd if dp else 0.0, "delta": 0.0})
            rec.metrics(rnd, "evaluate", site, _eval_row(rng, 30 + 5 * i, with_hist), split="val")
        rec.metrics(rnd, "evaluate", "global", {"num-examples": 105, "auc": 0.6 + 0.05 * rnd, "loss": 0.6}, split="val")
    for i, site in enumerate(["site_a", "site_b", "site_c"]):
        rec.metrics(3, "evaluate", site, _eval_row(rng, 30 + 5 * i, with_hist), split="test")
    rec.metrics(3, "evaluate", "global", {"num-examples": 105, "auc": 0.8, "acc": 0.7}, split="test")
    rec.event(2, "site_b", "update rejected", "array 'w' holds NaN or Inf")
    rec.event(3, "site_d", "no update", "BudgetSpent: budget spent")
    from client.trainer import build_screener

    rec.finish(ArrayRecord(build_screener(cfg).state_dict()))
    return run_dir


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.links, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        for key in ("src", "href"):
            if key in a:
                self.links.append(a[key])

    def handle_data(self, data):
        self.text.append(data)


def test_report_renders_offline_and_every_plot_file_loads(tmp_path):
    import matplotlib.image as mpimg

    run_dir = _run(tmp_path)
    assert main(["report", str(run_dir)]) == 0
    page = run_dir / "report" / "index.html"
    parser = _Refs()
    parser.feed(page.read_text())
    assert {"roc.png", "auc_by_round.png", "loss_by_round.png", "epsilon_by_round.png", "events.png"} <= set(parser.imgs)
    for src in parser.imgs:
        img = mpimg.imread(run_dir / "report" / src)
        assert img.shape[0] > 200 and img.shape[1] > 200 and img.std() > 0.01, src  # a drawn plot, not a blank file
    assert not any(re.match(r"(https?:)?//", ref) for ref in parser.links)  # nothing fetched from a network
    text = " ".join(parser.text)
    assert "update rejected" in text and "BudgetSpent" in text and "site_d" in text
    assert "pooled ROC from the summed score histograms" in text
    assert re.search(r"site_c\s+1: 1\.50, 2: 3\.00, 3: 4\.50", text)  # epsilon per round of the DP site
    md = (run_dir / "report" / "report.md").read_text()
    assert set(re.findall(r"\]\(([^)]+\.png)\)", md)) == set(parser.imgs)
    assert "| AUC | ACC | F1 | SEN | SPC | PRE |" in md


def test_without_histograms_the_report_shows_operating_points_and_says_so(tmp_path):
    run_dir = _run(tmp_path, with_hist=False)
    assert main(["report", str(run_dir)]) == 0
    text = (run_dir / "report" / "index.html").read_text()
    assert "no score histograms from every site" in text and "roc.png" in text


def test_histogram_roc_auc_is_the_exact_auc_of_the_binned_scores():
    rng = np.random.default_rng(1)
    labels = (rng.random(400) < 0.3).astype(int)
    scores = np.clip(0.4 + 0.25 * labels + rng.normal(0, 0.2, 400), 0, 0.999)
    neg, pos = histograms([_hist(labels, scores)])
    fpr, tpr, auc = roc_points(neg, pos)
    binned = np.clip((scores * BINS).astype(int), 0, BINS - 1)
    assert auc == pytest.approx(roc_auc_score(labels, binned), abs=1e-12)
    assert abs(auc - roc_auc_score(labels, scores)) < 0.01
    assert fpr[0] == tpr[0] == 1.0 and fpr[-1] == tpr[-1] == 0.0 and np.all(np.diff(tpr) <= 0)
    assert histograms([{"auc": 0.5}]) is None and not math.isnan(auc)


def test_report_of_a_folder_without_metrics_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


def test_compare_runs_on_the_same_test_patients_with_delong(tmp_path, capsys):
    import torch

    from simulation.synth import write_federation

    root = tmp_path / "sites"
    base = ["model=logreg", "num_sites=2", "synth.patients_per_site=[40,36]", "synth.image_size=64",
            "task.image_size=[32,32]", f"data_root={root}"]
    write_federation(compose(base))
    runs = []
    for name, scale, extra in (("fed", 1.0, []), ("central", -0.2, []), ("other_split", 1.0, ["seed=7"])):
        run_dir = tmp_path / name
        cfg = compose(base + extra + [f"run_dir={run_dir}"])
        from client.trainer import build_screener

        screener = build_screener(cfg)
        with torch.no_grad():  # a model that ranks by age (column 0) against one that barely does
            screener.net.linear.weight.zero_()
            screener.net.linear.weight[1, 0] = scale
        rec = RunRecorder(run_dir, cfg)
        rec.metrics(1, "evaluate", "site_a", _eval_row(np.random.default_rng(0), 20), split="test")
        rec.finish(ArrayRecord(screener.state_dict()))
        runs.append(run_dir)
    assert main(["report", str(runs[0]), "--compare", str(runs[1])]) == 0
    parser = _Refs()
    parser.feed((runs[0] / "report" / "index.html").read_text())
    text = " ".join(parser.text)
    assert "DeLong" in text and "central" in text
    from simulation.compare import compare_runs

    row = compare_runs(runs[0], runs[1])
    assert row["n"] > 10 and 0 <= row["p"] <= 1 and row["ci_low"] <= row["diff"] <= row["ci_high"]
    assert row["auc"] != row["auc_other"]
    assert main(["report", str(runs[0]), "--compare", str(runs[2])]) == 2  # another seed: other test patients
    assert "same patients" in capsys.readouterr().err
