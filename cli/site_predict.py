"""Hospital verb `predict`: score a folder of new patients with an exported model (work in client/predict.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.main import Verb


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("export_dir", help="a folder written by `fedmsk export` (model.safetensors, model_card.json, config.yaml)")
    p.add_argument("site_dir", help="the patients to score: clinical.csv + images/ (labels may be empty)")
    p.add_argument("--out", help="predictions CSV (default: <site_dir>/fedmsk-predictions.csv)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from client.predict import predict_site
    from shared.config import resolve_device

    console = Console()
    site = Path(args.site_dir)
    if not (site / "clinical.csv").is_file():
        Console(stderr=True).print(f"[bold red]{site}[/] is not a site folder: it has no clinical.csv", highlight=False)
        return 2
    try:
        result = predict_site(args.export_dir, site, args.out, device=resolve_device(args.device))
    except FileNotFoundError as exc:
        Console(stderr=True).print(f"[bold red]cannot predict:[/] {exc}", highlight=False)
        return 2
    console.print(f"scored {result.scored} patients -> {result.predictions}; {result.unusable} records unusable "
                  f"(file, reason, what to do: {result.report})", highlight=False)
    return 0 if result.scored else 1  # nothing scored is a failure, not a success


VERBS = [Verb("predict", "score new patients at this site with an exported model; writes a CSV",
              _add_arguments, _run, role="site")]
