"""`fedmsk report <run>`: the page a coordinator reads after (or during) a run.

``<run>/report/index.html`` and ``report.md`` with PNG plots beside them (matplotlib, files
referenced relatively, no script, font or stylesheet from anywhere: the page renders offline
and the folder can be mailed or archived as is). Everything comes from the run folder, i.e.
from what the sites sent: ``metrics.jsonl``, ``events.jsonl``, ``summary.json``, ``config.yaml``.

* ROC per site and pooled, from the sites' score histograms (``hist_neg_NN`` / ``hist_pos_NN``
  on a fixed grid; summed over sites they give the pooled ROC without any per-patient score).
  A run without histograms (multi-class, older runs) shows each site's operating point only.
* validation AUC and loss per round per site, training loss, epsilon per site per round;
* data sizes, the seed paper's table (AUC, ACC, F1, SEN, SPC, PRE) per site and pooled;
* events (refusals, rejected updates, dropouts, exclusions) on a round/site timeline and listed;
* with ``--compare`` (simulation only), DeLong's test against other runs on the same test patients.
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

METRICS = ("auc", "acc", "f1", "sen", "spc", "pre")
REPORT_DIRNAME = "report"
_NEG, _POS = re.compile(r"hist_neg_(\d+)$"), re.compile(r"hist_pos_(\d+)$")
# event kind -> (timeline group, colour); anything else is "other"
EVENT_GROUPS = {"update rejected": ("rejected", "tab:red"), "site excluded": ("excluded", "black"),
                "no update": ("no update / refused", "tab:orange"), "run stopped": ("run stopped", "darkred"),
                "resumed": ("resumed", "tab:blue")}


@dataclass
class RunData:
    run_dir: Path
    rows: list[dict[str, Any]]
    events: list[dict[str, Any]]
    summary: dict[str, Any]
    config_text: str

    def select(self, phase: str, split: str = "", site: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["phase"] == phase and r.get("split", "") == split and (site is None or r["site"] == site)]

    def sites(self) -> list[str]:
        return sorted({r["site"] for r in self.rows if r["site"] != "global"} | {e["site"] for e in self.events if e["site"] != "global"})


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def load_run_data(run_dir: str | Path) -> RunData:
    run_dir = Path(run_dir)
    rows = _jsonl(run_dir / "metrics.jsonl")
    if not rows:
        raise FileNotFoundError(f"{run_dir}/metrics.jsonl is missing or empty: not a fedmsk run folder, or no round was recorded yet")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    return RunData(run_dir, rows, _jsonl(run_dir / "events.jsonl"), summary, config)


# --- ROC from score histograms -------------------------------------------------------------

def histograms(rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray] | None:
    """(negatives, positives) per score bin summed over ``rows``; None when a row has none."""
    if not rows:
        return None
    sums = []
    for pattern in (_NEG, _POS):
        keys = sorted((int(m.group(1)), k) for k in rows[0] if (m := pattern.match(k)))
        if not keys or any(any(r.get(k) is None for _, k in keys) for r in rows):
            return None
        sums.append(np.clip(np.array([sum(float(r[k]) for r in rows) for _, k in keys]), 0, None))
    return sums[0], sums[1]


def roc_points(neg: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """FPR, TPR at every bin edge (score >= edge is positive) and the AUC (ties in a bin count 1/2)."""
    tpr = np.concatenate([np.cumsum(pos[::-1])[::-1], [0.0]]) / max(pos.sum(), 1e-12)
    fpr = np.concatenate([np.cumsum(neg[::-1])[::-1], [0.0]]) / max(neg.sum(), 1e-12)
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    auc = float((pos * (below + 0.5 * neg)).sum() / (neg.sum() * pos.sum())) if neg.sum() and pos.sum() else math.nan
    return fpr, tpr, auc


def last_split_rows(data: RunData, split: str) -> tuple[int | None, dict[str, dict[str, Any]]]:
    """The latest round evaluated on ``split`` and each site's row of it (global included)."""
    rows = data.select("evaluate", split)
    if not rows:
        return None, {}
    rnd = max(r["round"] for r in rows)
    return rnd, {r["site"]: r for r in rows if r["round"] == rnd}


# --- plots -------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def site_colour(data: RunData, site: str) -> str:
    """The same colour for a site in every plot; the pooled/global line is black."""
    if site == "global":
        return "black"
    palette = _plt().get_cmap("tab10").colors
    names = data.sites()
    return palette[names.index(site) % len(palette)] if site in names else "tab:gray"


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path.name


def plot_roc(data: RunData, out: Path) -> tuple[str | None, str]:
    """ROC per site and pooled on the test split (validation when no test round exists)."""
    plt = _plt()
    split = "test" if data.select("evaluate", "test") else "val"
    rnd, by_site = last_split_rows(data, split)
    sites = [s for s in sorted(by_site) if s != "global"]
    if not sites:
        return None, "no evaluation recorded yet"
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    ax.plot([0, 1], [0, 1], color="0.8", linestyle="--", linewidth=1)
    hist_sites = [s for s in sites if histograms([by_site[s]]) is not None]
    for site in sites:
        h = histograms([by_site[site]])
        if h is not None:
            fpr, tpr, auc = roc_points(*h)
            ax.plot(fpr, tpr, linewidth=1.2, color=site_colour(data, site), label=f"{site} (AUC {auc:.3f})")
        else:  # no histogram: the site's operating point from its confusion counts
            r = by_site[site]
            tp, fp, tn, fn = (float(r.get(k) or 0) for k in ("tp", "fp", "tn", "fn"))
            ax.plot([fp / max(fp + tn, 1)], [tp / max(tp + fn, 1)], "o", color=site_colour(data, site),
                    label=f"{site} (operating point)")
    note = "test split, final model" if split == "test" else f"{split} split, round {rnd}"
    if hist_sites and len(hist_sites) == len(sites):
        fpr, tpr, auc = roc_points(*histograms([by_site[s] for s in sites]))
        ax.plot(fpr, tpr, color="black", linewidth=2.5, label=f"pooled (AUC {auc:.3f})")
        note += "; pooled ROC from the summed score histograms of all sites"
    else:
        note += "; no score histograms from every site, so no pooled ROC (sites' operating points shown)"
    ax.set_xlabel("1 - specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (true-positive rate)")
    ax.set_title("ROC, test split, final model" if split == "test" else f"ROC, {split} split, round {rnd}")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, out / "roc.png"), note


def plot_by_round(data: RunData, out: Path, name: str, series: list[tuple[str, str, str]], ylabel: str, title: str,
                  dp_only: bool = False) -> str | None:
    """One line per site (and global, thicker) of ``key`` over rounds, for each (phase, split, key);
    ``dp_only``: only sites' rows trained with DP (epsilon means nothing elsewhere, nor averaged)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    drawn = 0
    for phase, split, key in series:
        for site in sorted({r["site"] for r in data.select(phase, split)}):
            if dp_only and site == "global":
                continue
            pts = [(r["round"], r.get(key)) for r in data.select(phase, split, site)
                   if r.get(key) is not None and (r.get("dp") or not dp_only)]
            pts = [(x, y) for x, y in pts if not math.isnan(float(y))]
            if not pts:
                continue
            label = site if len(series) == 1 else f"{site} ({split or phase})"
            style = "-" if (split or phase) != "train" or len(series) == 1 else ":"
            ax.plot(*zip(*pts), style, marker="o", markersize=3, label=label, color=site_colour(data, site),
                    linewidth=2.5 if site == "global" else 1.2)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    return _save(fig, out / name)


def plot_timeline(data: RunData, out: Path) -> str | None:
    """Events as marks on a round x site grid."""
    if not data.events:
        return None
    plt = _plt()
    sites = ["global"] + [s for s in data.sites()]
    fig, ax = plt.subplots(figsize=(5.2, 1.4 + 0.45 * len(sites)))
    seen = set()
    for ev in data.events:
        group, colour = EVENT_GROUPS.get(ev["event"], (ev["event"] if ev["event"].startswith("no ") else "other", "tab:gray"))
        y = sites.index(ev["site"]) if ev["site"] in sites else 0
        ax.scatter([ev["round"]], [y], color=colour, marker="x" if group == "rejected" else "o", s=60,
                   label=None if group in seen else group, zorder=3)
        seen.add(group)
    ax.set_yticks(range(len(sites)))
    ax.set_yticklabels(sites)
    ax.set_xlabel("round")
    rounds = [r["round"] for r in data.rows] + [e["round"] for e in data.events]
    ax.set_xlim(min(rounds) - 0.5, max(rounds) + 0.5)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(-0.6, len(sites) - 0.4)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title("events by round and site")
    return _save(fig, out / "events.png")


# --- tables ------------------------------------------------------------------------------

def _f(v: Any, digits: int = 3, count: bool = False) -> str:
    """A metric with ``digits`` decimals; ``count`` values (patients, rounds) as integers."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if count and isinstance(v, (int, float)):
        return str(int(round(v)))
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else str(v)


def sizes_table(data: RunData) -> list[list[str]]:
    out = []
    for site in data.sites():
        trains = data.select("train", "", site)
        vals, tests = data.select("evaluate", "val", site), data.select("evaluate", "test", site)
        out.append([site] + [_f(rows[-1].get("num-examples"), count=True) if rows else "-" for rows in (trains, vals, tests)]
                   + [str(len(trains))])
    return out


def paper_table(data: RunData) -> tuple[str, list[list[str]]]:
    """The seed paper's table on the test split: per site, all sites pooled, and (simulation) pooled locally."""
    split = "test" if data.select("evaluate", "test") else "val"
    rnd, by_site = last_split_rows(data, split)
    rows = [[s] + [_f(by_site[s].get(m)) for m in METRICS] + [_f(by_site[s].get("num-examples"), count=True)]
            for s in sorted(by_site) if s != "global"]
    if "global" in by_site:
        rows.append(["all sites (pooled from the sites' counts/histograms)"] + [_f(by_site["global"].get(m)) for m in METRICS]
                    + [_f(by_site["global"].get("num-examples"), count=True)])
    pooled = data.summary.get("pooled_test")
    if pooled:
        rows.append(["all test patients on one machine (simulation only)"] + [_f(pooled.get(m)) for m in METRICS]
                    + [_f(pooled.get("n"), count=True)])
        if pooled.get("oracle_auc") is not None:
            rows.append(["oracle (latent score, same patients)", _f(pooled["oracle_auc"])] + ["-"] * (len(METRICS) - 1)
                        + [_f(pooled.get("n"), count=True)])
    selected = (data.summary.get("operating_point") or {}).get("selected_round")
    where = f"{split} split, final model (from round {int(selected)})" if split == "test" and selected else f"{split} split, round {rnd}"
    return where, rows


def epsilon_table(data: RunData) -> list[list[str]]:
    out = []
    for site in data.sites():
        trains = [r for r in data.select("train", "", site) if r.get("dp")]
        if trains:
            out.append([site, ", ".join(f"{r['round']}: {_f(r.get('epsilon'), 2)}" for r in trains), _f(trains[-1].get("epsilon"), 2)])
    return out


# --- rendering ---------------------------------------------------------------------------

CSS = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3}.note{color:#555;font-size:13px}
.grid{display:flex;flex-wrap:wrap;gap:12px}.grid figure{margin:0;width:530px}img{width:100%;border:1px solid #eee}
figcaption{font-size:12px;color:#555}pre{background:#f7f7f7;padding:8px;font-size:11px;max-height:300px;overflow:auto}
.warn{color:#a00;font-weight:bold}"""


_NUMBER = re.compile(r"^-?[\d.]+$|^-$")


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td class='{'n' if _NUMBER.match(c) else 't'}'>{html.escape(c)}</td>" for c in row)
                   + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def compare_rows(comparisons: list[dict[str, Any]]) -> list[list[str]]:
    return [[Path(c["other"]).name, f"{c['other_model']} / {c['other_strategy']}", _f(c["n"], count=True), _f(c["auc"]),
             _f(c["auc_other"]), f"{c['diff']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]", f"{c['p']:.3g}"]
            for c in comparisons]


COMPARE_HEADER = ["other run", "model / strategy", "test patients", "AUC this run", "AUC other", "difference [95% CI]",
                  "DeLong p"]


def write_report(run_dir: str | Path, out: str | Path | None = None, comparisons: list[dict[str, Any]] | None = None) -> Path:
    """Write ``index.html``, ``report.md`` and the plots; returns the HTML path.

    ``comparisons``: rows from ``simulation.compare.compare_runs`` (simulation only).
    """
    data = load_run_data(run_dir)
    out_dir = Path(out) if out else data.run_dir / REPORT_DIRNAME
    out_dir.mkdir(parents=True, exist_ok=True)
    roc, roc_note = plot_roc(data, out_dir)
    figures = [
        (roc, f"ROC curves ({roc_note})."),
        (plot_by_round(data, out_dir, "auc_by_round.png", [("evaluate", "val", "auc")], "validation AUC",
                       "validation AUC per round"), "Validation AUC per round, each site and pooled (global)."),
        (plot_by_round(data, out_dir, "loss_by_round.png", [("evaluate", "val", "loss"), ("train", "", "train_loss")], "loss",
                       "loss per round"), "Validation loss (solid) and training loss (dotted) per round and site."),
        (plot_by_round(data, out_dir, "epsilon_by_round.png", [("train", "", "epsilon")], "epsilon spent",
                       "privacy spent per site (DP-SGD)", dp_only=True) if epsilon_table(data) else None,
         "Epsilon each site reported spending, after each round."),
        (plot_timeline(data, out_dir), "Events: refusals, rejected updates, dropouts, exclusions."),
    ]
    figures = [(f, c) for f, c in figures if f]
    s = data.summary
    title = f"fedmsk run {data.run_dir.name}: {s.get('model', '?')} on {s.get('task', '?')}"
    facts = [f"strategy {s.get('strategy', '?')}, {s.get('rounds', '?')} rounds", (s.get("privacy") or {}).get("line", "")]
    op = s.get("operating_point") or {}
    if op.get("threshold") is not None:
        selected = op.get("selected_round")
        facts.append(f"operating threshold {op['threshold']:.2f} chosen on validation ({op.get('rule')}); "
                     f"final model from round {int(selected) if selected else '-'} (best pooled validation AUC)")
    stopped = s.get("stopped")
    if not s:
        facts.append("the run has not finished (no summary.json yet): this page shows the rounds recorded so far")
    where, paper = paper_table(data)
    sizes_h = ["site", "train patients", "validation", "test", "rounds trained"]
    paper_h = ["site"] + [m.upper() for m in METRICS] + ["n"]
    eps = epsilon_table(data)
    events = [[str(e["round"]), e["site"], e["event"], e["reason"]] for e in data.events]

    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f"<p class='note'>{html.escape(f)}</p>" for f in facts if f]
    if stopped:
        parts.append(f"<p class='warn'>Run stopped: {html.escape(str(stopped))}</p>")
    parts.append(f"<h2>Screening metrics ({html.escape(where)})</h2>" + _table(paper_h, paper))
    parts.append("<p class='note'>AUC, ACC (accuracy), F1, SEN (sensitivity), SPC (specificity), PRE (precision), as the "
                 "MM-CL paper reports them. The pooled row is computed at the server from what the sites sent "
                 "(confusion counts and score histograms), never from per-patient scores.</p>")
    if comparisons:
        parts.append("<h2>Compared with other runs (same test patients, DeLong's test)</h2>"
                     + _table(COMPARE_HEADER, compare_rows(comparisons))
                     + "<p class='note'>Both final models scored on all sites' test patients pooled on the researcher's "
                       "machine (simulation only: per-patient scores never leave a real site).</p>")
    parts.append("<h2>Plots</h2><div class='grid'>" + "".join(
        f"<figure><img src='{html.escape(f)}' alt='{html.escape(c)}'><figcaption>{html.escape(c)}</figcaption></figure>"
        for f, c in figures) + "</div>")
    parts.append("<h2>Data per site</h2>" + _table(sizes_h, sizes_table(data)))
    if eps:
        parts.append("<h2>Privacy spent (epsilon per round)</h2>" + _table(["site", "epsilon after each round", "latest"], eps))
    parts.append("<h2>Events</h2>" + (_table(["round", "site", "event", "reason"], events) if events else "<p>none</p>"))
    if data.config_text:
        parts.append(f"<h2>Config</h2><pre>{html.escape(data.config_text)}</pre>")
    parts.append("</body></html>")
    html_path = out_dir / "index.html"
    html_path.write_text("\n".join(parts), encoding="utf-8")

    md = [f"# {title}", ""] + [f"{f}  " for f in facts if f] + [""]
    if stopped:
        md += [f"**Run stopped:** {stopped}", ""]
    md += [f"## Screening metrics ({where})", "", _md_table(paper_h, paper), ""]
    if comparisons:
        md += ["## Compared with other runs (same test patients, DeLong's test)", "",
               _md_table(COMPARE_HEADER, compare_rows(comparisons)), ""]
    md += ["## Plots", ""]
    md += [f"![{c}]({f})\n\n{c}\n" for f, c in figures]
    md += ["## Data per site", "", _md_table(sizes_h, sizes_table(data)), ""]
    if eps:
        md += ["## Privacy spent", "", _md_table(["site", "epsilon after each round", "latest"], eps), ""]
    md += ["## Events", "", _md_table(["round", "site", "event", "reason"], events) if events else "none", ""]
    (out_dir / "report.md").write_text("\n".join(md), encoding="utf-8")
    return html_path
