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
