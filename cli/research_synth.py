"""Researcher verb `synth`: write synthetic hospitals (the work is in simulation/synth.py)."""

from __future__ import annotations

import argparse

from cli.main import Verb


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides, e.g. num_sites=5 seed=3 data_root=data/fed5 synth.patients_per_site=[300]",
    )


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from shared.config import compose
    from simulation.generators import generator_for

    cfg = compose(args.overrides)
    console = Console()
    generator = generator_for(cfg)
    columns, rows = generator.describe(cfg)  # config mistakes surface before anything is drawn
    with Progress(
        TextColumn(generator.what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("synth", total=generator.total_steps(cfg))
        root = generator.write_federation(cfg, lambda: progress.advance(task))

    table = Table(title=f"synthetic federation for {cfg.task.name} (seed {cfg.seed})")
    for col in columns:
        table.add_column(col, justify="right" if col in ("patients", "prevalence", "fractures", "missing") else "left")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"written to [bold]{root.resolve()}[/] (oracle.csv and README.txt beside the site folders)")
    return 0


VERBS = [
    Verb(
        "synth",
        "write synthetic hospitals for the task (DICOM radiographs or CT series + clinical.csv, known ground truth) under data_root",
        _add_arguments,
        _run,
        role="researcher",
    )
]
