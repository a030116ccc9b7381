"""Researcher verbs: run a whole federation on one machine, or the pooled baseline."""

from __future__ import annotations

import argparse

from rich.console import Console

from cli.main import Verb, load_training_checks
from shared.config import compose


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. num_sites=5 rounds=10 model=image_only")


def _simulate(args: argparse.Namespace) -> int:
    from simulation.runner import simulate, start_ray_early, stop_ray

    start_ray_early(args.overrides)  # Ray and its workers start while torch, Flower and the checks import
    try:
        from server.federation import RunStopped

        load_training_checks()
        try:
            simulate(compose(args.overrides), Console())
        except RunStopped as stop:  # nobody trained: the run folder says why; never "completed"
            Console(stderr=True).print(f"[bold red]run stopped:[/] {stop}", highlight=False)
            return 1
        return 0
    finally:
        stop_ray()  # a config the full checks refuse never reaches simulate, which would have stopped it


def _central(args: argparse.Namespace) -> int:
    from simulation.central import central

    load_training_checks()
    central(compose(args.overrides), Console())
    return 0


VERBS = [
    Verb("simulate", "run a federation of every site folder under data_root with Flower's simulation engine", _overrides, _simulate),
    Verb("central", "pooled baseline: train the same model on all sites' training data together", _overrides, _central),
]
