"""Coordinator verbs on a run folder: `export` (work in server/export.py) and `report` (server/html_report.py)."""

from __future__ import annotations

import argparse

from cli.main import Verb


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a finished run folder (runs/<verb>-<time>/)")
    p.add_argument("--out", help="where to write (default: <run_dir>/export/)")


def _export(args: argparse.Namespace) -> int:
    from rich.console import Console

    from server.export import export_run

    try:
        out = export_run(args.run_dir, args.out)
    except FileNotFoundError as exc:
        Console(stderr=True).print(f"[bold red]cannot export:[/] {exc}", highlight=False)
        return 2
    Console().print(f"exported to {out}: model.safetensors, model.onnx, model_card.json/.md, config.yaml", highlight=False)
    return 0


VERBS = [Verb("export", "write a finished run's model as safetensors + ONNX with a model card", _export_arguments, _export,
              role="coordinator")]


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run folder (finished, or still running: the rounds so far)")
    p.add_argument("--out", help="where to write (default: <run_dir>/report/)")
    p.add_argument("--compare", action="append", default=[], metavar="OTHER_RUN",
                   help="simulation only: DeLong's test against another run on the same test patients (repeatable; "
                        "a `fedmsk central` run gives federated vs pooled)")


def _report(args: argparse.Namespace) -> int:
    from rich.console import Console

    from server.html_report import write_report

    try:
        comparisons = []
        if args.compare:
            from simulation.compare import compare_runs

            comparisons = [compare_runs(args.run_dir, other) for other in args.compare]
        page = write_report(args.run_dir, args.out, comparisons)
    except (FileNotFoundError, ValueError) as exc:
        Console(stderr=True).print(f"[bold red]cannot report:[/] {exc}", highlight=False)
        return 2
    Console().print(f"report: {page} (and report.md, plots beside it; opens offline)", highlight=False)
    return 0


VERBS.append(Verb("report", "write a run's HTML + Markdown report: ROC, AUC/loss/epsilon per round, events, metrics table",
                  _report_arguments, _report, role="coordinator"))
