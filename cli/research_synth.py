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
    from simulation.synth import site_specs, total_steps, write_federation

    cfg = compose(args.overrides)
    console = Console()
    specs = site_specs(cfg)  # config mistakes surface before anything is drawn
    with Progress(
        TextColumn("drawing radiographs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("synth", total=total_steps(cfg))
        root = write_federation(cfg, advance=lambda: progress.advance(task))

    table = Table(title=f"synthetic federation (seed {cfg.seed})")
    for col in ("site", "patients", "prevalence", "scanner", "spacing", "missing", "sex"):
        table.add_column(col, justify="right" if col in ("patients", "prevalence", "missing") else "left")
    for sp in specs:
        sc = sp.scanner
        table.add_row(
            sp.name,
            str(sp.patients),
            f"{sp.prevalence:.2f}",
            f"{sc.modality} {sc.photometric} {sc.bits_stored}-bit",
            f"{sc.spacing_mm} mm",
            f"{sp.missing_rate:.2f}",
            "/".join(sp.sex_spelling),
        )
    console.print(table)
    console.print(f"written to [bold]{root.resolve()}[/] (oracle.csv and README.txt beside the site folders)")
    return 0


VERBS = [
    Verb(
        "synth",
        "write synthetic hospitals (DICOM hip radiographs + clinical.csv, known ground truth) under data_root",
        _add_arguments,
        _run,
        role="researcher",
    )
]
