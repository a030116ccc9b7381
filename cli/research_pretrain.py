"""`fedmsk pretrain-public`: encoders trained centrally on public (e.g. synthetic) hospitals, for DP fine-tuning."""

from __future__ import annotations

import argparse

from rich.console import Console

from cli.main import Verb, load_training_checks
from shared.config import compose


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*",
                   help="Hydra overrides; data_root= names the folder of public site folders, run_dir= where encoder.pt goes")


def _pretrain_public(args: argparse.Namespace) -> int:
    from simulation.pretrain_public import pretrain_public

    load_training_checks()
    pretrain_public(compose(args.overrides), Console())
    return 0


VERBS = [
    Verb("pretrain-public", "train the encoders on public (synthetic or coordinator-named) sites; writes encoder.pt for "
         "model.pretrained_path", _overrides, _pretrain_public),
]
