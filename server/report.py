"""The run folder: per-round metrics, checkpoints, final model, model card, summary, plots.

Everything a coordinator reads after a run is written here, by the server, from what the
sites sent (weights and whitelisted scalars). Files are written atomically (temp file +
rename) so a crash mid-write never leaves a half checkpoint or a torn summary.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from shared.atomic import atomic_write_bytes, atomic_write_text
from shared.config import FedmskConfig, to_yaml
from shared.metrics import METRIC_NAMES
from shared.provenance import compose_privacy, finetune_privacy, provenance


def save_state(path: Path, arrays: ArrayRecord) -> None:
    import io

    buf = io.BytesIO()
    torch.save(arrays.to_torch_state_dict(), buf)
    atomic_write_bytes(path, buf.getvalue())


IN_FILE_ONLY = ("hist_",)  # score-histogram bins: 100 numbers a row, read back from metrics.jsonl only (ROC)


def _kept(row: dict[str, Any]) -> dict[str, Any]:
    """A row as held in memory: without its histogram bins (at 200 sites they were most of the driver's rows)."""
    return {k: v for k, v in row.items() if not k.startswith(IN_FILE_ONLY)}


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


@dataclass
class RunRecorder:
    """Collects a run's metrics as they arrive and writes the run folder.

    Site rows live in ``metrics.jsonl`` only (``rows`` reads them back when the run ends); the
    pooled rows (site ``global``: a few a round, what the run decides on) stay in memory too.
    Holding every site's rows had grown the coordinator by 0.4 MB a round at 100 sites.
    """

    run_dir: Path
    cfg: FedmskConfig
    events: list[dict[str, Any]] = field(default_factory=list)
    pooled: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "checkpoints").mkdir(exist_ok=True)
        atomic_write_text(self.run_dir / "config.yaml", to_yaml(self.cfg))
        self._metrics_path = self.run_dir / "metrics.jsonl"
        # where this run's rows begin: a resumed run keeps what the interrupted one recorded
        self._start = 0 if self.cfg.resume or not self._metrics_path.is_file() else self._metrics_path.stat().st_size
        if self.cfg.resume:
            self.pooled.extend(r for r in self.rows if r["site"] == "global")
            path = self.run_dir / "events.jsonl"
            if path.is_file():
                self.events.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())

    def read_rows(self, offset: int | None = None) -> tuple[list[dict[str, Any]], int]:
        """The rows recorded from byte ``offset`` (this run's start by default), as held in memory
        (``_kept``), and the offset after the last whole line."""
        offset = self._start if offset is None else offset
        if not self._metrics_path.is_file():
            return [], offset
        with self._metrics_path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        return [_kept(json.loads(line)) for line in data[:end].splitlines() if line.strip()], offset + end

    @property
    def rows(self) -> list[dict[str, Any]]:
        """Every row of this run (read from metrics.jsonl)."""
        return self.read_rows()[0]

    def end_offset(self) -> int:
        return self._metrics_path.stat().st_size if self._metrics_path.is_file() else 0

    def latest_checkpoint(self) -> tuple[int, ArrayRecord] | None:
        """The last round checkpointed in this run folder, for resuming after a crash."""
        marker = self.run_dir / "checkpoints" / "latest.json"
        if not marker.is_file():
            return None
        info = json.loads(marker.read_text())
        state = torch.load(self.run_dir / "checkpoints" / info["path"], map_location="cpu", weights_only=True)
        return int(info["round"]), ArrayRecord(state)

    def metrics(self, round_: int, phase: str, site: str, values: dict[str, float], split: str = "") -> None:
        row = {"round": round_, "phase": phase, "split": split, "site": site, "time": round(time.time(), 3)}
        row.update({k: _clean(float(v)) for k, v in values.items()})
        if site == "global":
            self.pooled.append(_kept(row))
        with self._metrics_path.open("a") as fh:  # append-only log, one JSON object a line
            fh.write(json.dumps(row) + "\n")

    def event(self, round_: int, site: str, kind: str, reason: str) -> None:
        ev = {"round": round_, "site": site, "event": kind, "reason": reason}
        self.events.append(ev)
        with (self.run_dir / "events.jsonl").open("a") as fh:
            fh.write(json.dumps(ev) + "\n")

    def checkpoint(self, round_: int, arrays: ArrayRecord) -> Path:
        path = self.run_dir / "checkpoints" / f"round_{round_:04d}.pt"
        save_state(path, arrays)
        atomic_write_text(self.run_dir / "checkpoints" / "latest.json", json.dumps({"round": round_, "path": path.name}))
        return path

    def checkpoint_of(self, round_: int) -> ArrayRecord:
        """The global model checkpointed after ``round_``."""
        path = self.run_dir / "checkpoints" / f"round_{round_:04d}.pt"
        return ArrayRecord(torch.load(path, map_location="cpu", weights_only=True))

    def select(self, *, phase: str, split: str = "", site: str | None = None,
               rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Rows of one phase/split (and site); the pooled ones come from memory, the others from the file."""
        if rows is None:
            rows = self.pooled if site == "global" else self.rows
        return [r for r in rows if r["phase"] == phase and r["split"] == split and (site is None or r["site"] == site)]

    def finish(self, arrays: ArrayRecord, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Final model, model card, summary (JSON + Markdown) and the AUC-per-round plot."""
        save_state(self.run_dir / "final_model.pt", arrays)
        rows = self.rows
        test_rows = self.select(phase="evaluate", split="test", rows=rows)
        train_rows = self.select(phase="train", rows=rows)
        sites = sorted({r["site"] for r in test_rows if r["site"] != "global"})
        per_site = {}
        for s in sites:
            test = next((r for r in reversed(test_rows) if r["site"] == s), {})
            trains = [r for r in train_rows if r["site"] == s]
            per_site[s] = {
                "train_examples": trains[-1]["num-examples"] if trains else None,
                "test_examples": test.get("num-examples"),
                "epsilon": max((r.get("epsilon") or 0.0 for r in trains), default=None) if trains and trains[-1].get("dp") else None,
                "rounds_trained": len(trains),
                **{m: test.get(m) for m in METRIC_NAMES},
            }
        pooled = next((r for r in reversed(test_rows) if r["site"] == "global"), {})
        val_auc = [(r["round"], r.get("auc")) for r in self.select(phase="evaluate", split="val", site="global")]
        summary = {
            "run_dir": str(self.run_dir),
            "task": self.cfg.task.name,
            "model": self.cfg.model.name,
            "strategy": self.cfg.strategy.name,
            "rounds": self.cfg.rounds,
            # a site's own policy can switch DP on even when the run did not ask for it
            "privacy": {"enabled": self.cfg.privacy.enabled or any(r.get("dp") for r in train_rows),
                        "line": dp_line(rows, self.events)},
            "val_auc_by_round": val_auc,
            "test_global": {m: pooled.get(m) for m in METRIC_NAMES},
            # threshold chosen on validation (server.operating_point); AUC pooled from score histograms
            "operating_point": {"rule": self.cfg.task.operating_point, "threshold": pooled.get("threshold"),
                                "selected_round": pooled.get("selected_round"), "auc_site_mean": pooled.get("auc_site_mean")},
            "test_per_site": per_site,
            "events": self.events,
        }
        summary.update(extra or {})
        # from federated-pretrained weights: per site, pretraining + this run's epsilon (shared.provenance)
        summary["privacy_composition"] = compose_privacy(provenance(self.cfg.model.pretrained_path), finetune_privacy(rows))
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        card = {
            "model": self.cfg.model.name,
            "task": self.cfg.task.name,
            "weights": "final_model.pt",
            "sites": {s: {k: per_site[s][k] for k in ("train_examples", "test_examples", "epsilon")} for s in sites},
            "test_metrics_global": summary["test_global"],
            "config": "config.yaml",
            # which data were public (the weights it started from) and which private (shared.provenance)
            "pretrained": provenance(self.cfg.model.pretrained_path),
            "finetune": self.cfg.model.finetune,
            "privacy_composition": summary["privacy_composition"],
            "private_data": "each site's training split (DP-SGD where the site's epsilon is set); val/test metrics "
                            "are outside DP-SGD unless the site's policy noises them",
        }
        atomic_write_text(self.run_dir / "model_card.json", json.dumps(card, indent=2))
        atomic_write_text(self.run_dir / "summary.md", render_summary(summary))
        self.plot(rows)
        return summary

    def plot(self, rows: list[dict[str, Any]] | None = None) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        val = self.select(phase="evaluate", split="val", rows=self.rows if rows is None else rows)
        for site in sorted({r["site"] for r in val}):
            points = [r for r in val if r["site"] == site]
            ax.plot([r["round"] for r in points], [r.get("auc") for r in points], marker="o",
                    label=site, linewidth=2.5 if site == "global" else 1)
        ax.set_xlabel("round")
        ax.set_ylabel("validation AUC")
        ax.set_title(f"{self.cfg.model.name} on {self.cfg.task.name}")
        if ax.lines:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.run_dir / "auc_by_round.png", dpi=100)
        plt.close(fig)


def dp_line(rows: list[dict[str, Any]], events: list[dict[str, Any]]) -> str:
    """What the sites actually did this run, from their train replies (a site's policy wins over the run's)."""
    sites = {r["site"] for r in rows if r["site"] != "global"} | {e["site"] for e in events if e["site"] != "global"}
    trained = [r for r in rows if r["phase"] == "train" and r["site"] != "global"]
    if not trained:
        return f"DP: no site trained ({len(sites)} sites refused or failed)" if sites else "DP: no site trained"
    eps: dict[str, float] = {}
    for r in trained:
        if r.get("dp"):
            eps[r["site"]] = max(eps.get(r["site"], 0.0), r.get("epsilon") or 0.0)
    plain = {r["site"] for r in trained} - set(eps)
    parts = []
    if eps:
        parts.append(f"{len(eps)}/{len(sites)} sites trained with DP-SGD (epsilon spent at the sites "
                     f"{min(eps.values()):.2f}-{max(eps.values()):.2f})")
    if plain:
        parts.append(f"{len(plain)}/{len(sites)} trained without DP")
    return "DP: " + "; ".join(parts)


def _fmt(v: Any) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) > 1:
        v = int(v)
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def render_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"# fedmsk run: {summary['model']} on {summary['task']}",
        "",
        f"strategy {summary['strategy']}, {summary['rounds']} rounds",
        "",
        summary["privacy"].get("line") or f"DP {'on' if summary['privacy']['enabled'] else 'off'}",
        "",
        *([f"**Run stopped:** {summary['stopped']}", ""] if summary.get("stopped") else []),
        "| site | " + " | ".join(m.upper() for m in METRIC_NAMES) + " | test n | epsilon |",
        "|---" * (len(METRIC_NAMES) + 3) + "|",
    ]
    for site, row in summary["test_per_site"].items():
        lines.append(f"| {site} | " + " | ".join(_fmt(row[m]) for m in METRIC_NAMES) + f" | {_fmt(row['test_examples'])} | {_fmt(row['epsilon'])} |")
    g = summary["test_global"]
    lines.append("| **all sites** | " + " | ".join(_fmt(g[m]) for m in METRIC_NAMES) + " | | |")
    lines.append("")
    op = summary.get("operating_point") or {}
    if op.get("threshold") is not None:
        lines.append(
            f"Model of round {_fmt(op.get('selected_round'))} (best pooled validation AUC). AUC over all sites is pooled "
            f"from the sites' score histograms (mean of site AUCs: {_fmt(op.get('auc_site_mean'))}); ACC/F1/SEN/SPC/PRE "
            f"at threshold {op['threshold']:.2f}, chosen on validation ({op['rule']}), from the pooled counts."
        )
    else:
        lines.append("AUC over all sites is the example-weighted mean of site AUCs; the other metrics pool the sites' confusion counts.")
    for key, label in (("oracle_auc", "oracle AUC (latent score, same test patients)"), ("pooled_test", "pooled test set, evaluated locally")):
        if key in summary:
            lines.append(f"- {label}: {summary[key] if not isinstance(summary[key], dict) else ', '.join(f'{k} {_fmt(v)}' for k, v in summary[key].items())}")
    if summary["val_auc_by_round"]:
        lines.append("- validation AUC by round: " + ", ".join(f"{r}: {_fmt(a)}" for r, a in summary["val_auc_by_round"]))
    for ev in summary["events"]:
        lines.append(f"- round {ev['round']} {ev['site']}: {ev['event']}: {ev['reason']}")
    return "\n".join(lines) + "\n"
