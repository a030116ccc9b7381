"""`fedmsk export <run>`: the finished model in forms a hospital can use without the run folder.

``<run>/export/`` (or ``--out``) holds:

* ``model.safetensors``: the final weights (the round the run selected), safetensors because it
  is a plain tensor container that cannot execute code on load, unlike a pickle (``.pt``);
* ``model.onnx``: image + clinical features -> class probabilities, for inference outside
  fedmsk (onnxruntime, any language). Exported with TorchScript-based ``torch.onnx.export(...,
  dynamo=False)``: torch 2.13's default dynamo exporter needs ``onnxscript``, which fedmsk does
  not depend on, and the legacy exporter handles every fedmsk model (tests/test_export.py
  compares onnxruntime with torch). A model that ignores an input (clinical_only, logreg) has
  no such input in the ONNX graph; the card lists the inputs there are;
* ``model_card.json`` / ``model_card.md``: task, sites and their sizes, metrics, epsilon per site,
  pretraining provenance, how clinical inputs are scaled, the full config and the code version;
* ``config.yaml``: the run's config, what ``fedmsk predict`` rebuilds the model and intake from.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.atomic import atomic_write_text
from shared.config import FedmskConfig, from_yaml, to_yaml

EXPORT_DIRNAME = "export"
WEIGHTS, ONNX, CARD, CARD_MD, CONFIG = "model.safetensors", "model.onnx", "model_card.json", "model_card.md", "config.yaml"
ONNX_OPSET = 17
REPO_ROOT = Path(__file__).resolve().parent.parent


class ScoringModel(nn.Module):
    """The screening network as inference sees it: (image, clinical features) -> class probabilities.

    The training criterion (and any learnable part of it, e.g. class prototypes) is not part of
    inference and stays out of the export.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(image, clinical)["logits"].float(), dim=1)


def build_scoring_model(cfg: FedmskConfig, state: dict[str, torch.Tensor]) -> ScoringModel:
    from client.trainer import build_screener

    screener = build_screener(cfg)
    screener.load_state_dict(state)
    return ScoringModel(screener.net).eval()


def example_inputs(cfg: FedmskConfig, n: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from shared.clinical import feature_names

    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 1, *cfg.task.image_size, generator=gen)
    clinical = torch.randn(n, len(feature_names(cfg.task)), generator=gen)
    return image, clinical


def export_onnx(model: ScoringModel, cfg: FedmskConfig, path: Path) -> list[str]:
    """Write the ONNX graph with a dynamic batch axis; returns the graph's input names."""
    import onnx

    axes = {"image": {0: "batch"}, "clinical": {0: "batch"}, "probabilities": {0: "batch"}}
    with warnings.catch_warnings():  # the legacy exporter's deprecation notice: chosen on purpose (module docstring)
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example_inputs(cfg), str(path), input_names=["image", "clinical"],
                          output_names=["probabilities"], dynamic_axes=axes, opset_version=ONNX_OPSET, dynamo=False)
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    return [i.name for i in graph.graph.input]


def code_version() -> dict[str, Any]:
    """fedmsk's version and, from a git checkout, the commit and whether the tree had local changes."""
    out: dict[str, Any] = {"fedmsk": _version("fedmsk"), "torch": torch.__version__, "flwr": _version("flwr"),
                           "git_commit": None, "git_dirty": None}
    try:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10)
            out["git_dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def pretraining(cfg: FedmskConfig) -> dict[str, Any]:
    """Where the initial weights came from: the local file (and its SHA-256) or random init."""
    path = cfg.model.pretrained_path
    if not path:
        return {"source": "random initialisation (no model.pretrained_path)"}
    p = Path(path)
    digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
    return {"source": str(p), "sha256": digest, "note": None if digest else "file not found at export time"}


def model_card(run_dir: Path, cfg: FedmskConfig, summary: dict[str, Any], onnx_inputs: list[str]) -> dict[str, Any]:
    from shared.clinical import feature_names

    per_site = summary.get("test_per_site", {})
    return {
        "model": cfg.model.name,
        "task": {
            "name": cfg.task.name, "modality": cfg.task.modality, "label_column": cfg.task.label_column,
            "classes": list(cfg.task.classes), "class_names": list(cfg.task.class_names),
            "image_size": list(cfg.task.image_size),
            "clinical_columns": [{"name": c.name, "unit": c.unit, "kind": c.kind} for c in cfg.task.columns if c.feature],
        },
        "inputs": {
            "image": f"float32 [batch, 1, {', '.join(map(str, cfg.task.image_size))}], preprocessed by fedmsk's intake (0..1)",
            "clinical": f"float32 [batch, {len(feature_names(cfg.task))}]: {', '.join(feature_names(cfg.task))}",
            "clinical_scaling": "task reference values (ClinicalScaler.from_reference); training without DP used "
                                "each site's own fitted scaler, so scores can shift slightly against training",
            "onnx_inputs": onnx_inputs,
        },
        "output": "probabilities [batch, classes] (softmax)",
        "operating_point": summary.get("operating_point"),
        "training": {
            "run": str(run_dir), "strategy": cfg.strategy.name, "rounds": cfg.rounds,
            "local_epochs": cfg.federation.local_epochs,
            "selected_round": (summary.get("operating_point") or {}).get("selected_round"),
            "site_local_params": list(cfg.strategy.local_params),
            "site_local_note": ("the parameters named in site_local_params stayed at each site; this model holds "
                                "their initial values") if cfg.strategy.local_params else None,
            "privacy": summary.get("privacy"),
        },
        "sites": {s: {k: row.get(k) for k in ("train_examples", "test_examples", "epsilon", "rounds_trained")}
                  for s, row in per_site.items()},
        "metrics": {"test_global": summary.get("test_global"), "test_per_site": per_site,
                    "pooled_test": summary.get("pooled_test")},
        "pretraining": pretraining(cfg),
        "code": code_version(),
        "config": CONFIG,
    }


def render_card(card: dict[str, Any]) -> str:
    """The card as a page a person reads."""
    from server.report import _fmt
    from shared.metrics import METRIC_NAMES

    t = card["task"]
    lines = [f"# Model card: {card['model']} for {t['name']}", "",
             f"Inputs: {card['inputs']['image']}; {card['inputs']['clinical']}.", "",
             f"Output: {card['output']}. Clinical scaling: {card['inputs']['clinical_scaling']}.", "",
             f"Trained with {card['training']['strategy']} over {card['training']['rounds']} rounds "
             f"(final model from round {int(card['training']['selected_round']) if card['training']['selected_round'] else '-'}).", ""]
    if card["training"]["site_local_note"]:
        lines += [f"Note: {card['training']['site_local_note']} ({', '.join(card['training']['site_local_params'])}).", ""]
    lines += ["| site | train n | test n | epsilon | " + " | ".join(m.upper() for m in METRIC_NAMES) + " |",
              "|---" * (4 + len(METRIC_NAMES)) + "|"]
    for site, row in card["metrics"]["test_per_site"].items():
        lines.append(f"| {site} | {_fmt(row.get('train_examples'))} | {_fmt(row.get('test_examples'))} | "
                     f"{_fmt(row.get('epsilon'))} | " + " | ".join(_fmt(row.get(m)) for m in METRIC_NAMES) + " |")
    g = card["metrics"]["test_global"] or {}
    lines.append("| **all sites** | | | | " + " | ".join(_fmt(g.get(m)) for m in METRIC_NAMES) + " |")
    code = card["code"]
    lines += ["", f"Pretraining: {card['pretraining']['source']}.",
              f"Code: fedmsk {code['fedmsk']}, git {code['git_commit'] or 'unknown'}"
              f"{' (local changes)' if code['git_dirty'] else ''}; torch {code['torch']}, flwr {code['flwr']}.",
              f"Config: {card['config']}."]
    return "\n".join(lines) + "\n"


def load_run(run_dir: Path) -> tuple[FedmskConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """The run's config, final weights and summary; a clear error when the run did not finish."""
    missing = [n for n in ("config.yaml", "final_model.pt", "summary.json") if not (run_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{run_dir} is not a finished fedmsk run folder (missing {', '.join(missing)}); "
                                f"export a run that reached its end (fedmsk simulate / launch)")
    cfg = from_yaml((run_dir / "config.yaml").read_text(), origin=str(run_dir / "config.yaml"))
    state = torch.load(run_dir / "final_model.pt", map_location="cpu", weights_only=True)
    return cfg, state, json.loads((run_dir / "summary.json").read_text())


def export_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the export folder for a finished run; returns its path."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    cfg, state, summary = load_run(run_dir)
    out_dir = Path(out) if out else run_dir / EXPORT_DIRNAME
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_scoring_model(cfg, state)
    weights = {f"net.{k}": v.detach().contiguous() for k, v in model.net.state_dict().items()}
    save_file(weights, str(out_dir / WEIGHTS), metadata={"model": cfg.model.name, "task": cfg.task.name})
    onnx_inputs = export_onnx(model, cfg, out_dir / ONNX)
    card = model_card(run_dir, cfg, summary, onnx_inputs)
    atomic_write_text(out_dir / CONFIG, to_yaml(cfg))
    atomic_write_text(out_dir / CARD, json.dumps(card, indent=2))
    atomic_write_text(out_dir / CARD_MD, render_card(card))
    for path in out_dir.iterdir():  # a model to hand out: readable like the ONNX file, not 0600 temp-file modes
        path.chmod(0o644)
    return out_dir


def load_export(export_dir: str | Path) -> tuple[FedmskConfig, ScoringModel, dict[str, Any]]:
    """Config, scoring model (from the safetensors weights) and card of an export folder."""
    from safetensors.torch import load_file

    d = Path(export_dir)
    missing = [n for n in (WEIGHTS, CARD, CONFIG) if not (d / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{d} is not a fedmsk export (missing {', '.join(missing)}); run `fedmsk export <run>` first")
    cfg = from_yaml((d / CONFIG).read_text(), origin=str(d / CONFIG))
    from client.trainer import build_screener

    model = ScoringModel(build_screener(cfg).net)
    model.load_state_dict(load_file(str(d / WEIGHTS)))
    return cfg, model.eval(), json.loads((d / CARD).read_text())
