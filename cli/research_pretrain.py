"""Pretraining verbs: `fedmsk pretrain` (federated, on the hospitals' own patients, labelled or not) and
`fedmsk pretrain-public` (centrally, on data the consortium treats as public)."""

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


def pretrain_overrides(words: list[str]) -> list[str]:
    """``objective=ssl`` -> ``pretrain=ssl`` (the config group), ``out=DIR`` -> ``run_dir=DIR``; the rest as given."""
    aliases = {"objective": "pretrain", "out": "run_dir"}
    out = []
    for word in words:
        key, sep, value = word.partition("=")
        out.append(f"{aliases[key]}={value}" if sep and key in aliases else word)
    return out


def _pretrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*",
                   help="objective=ssl|crossmodal (the pretrain/ config group), out=DIR (the run folder: encoder.pt and "
                        "encoder_card.json go there), then Hydra overrides (data_root=, rounds=, privacy=eps8, "
                        "pretrain.ssl_loss=simsiam|bank, pretrain.negatives=bank|batch, ...)")


def _pretrain(args: argparse.Namespace) -> int:
    from server.federation import RunStopped
    from simulation.pretrain_fed import run_federated_pretrain

    load_training_checks()
    try:
        run_federated_pretrain(compose(pretrain_overrides(args.overrides)), console=Console())
    except RunStopped as stop:  # nobody trained: no weights, never "completed"
        Console(stderr=True).print(f"[bold red]run stopped:[/] {stop}", highlight=False)
        return 1
    return 0


VERBS = [
    Verb("pretrain", "federated self-supervised (objective=ssl) or cross-modal (objective=crossmodal) pretraining of the "
         "task's encoders on every site's patients, labelled or not; writes encoder.pt + card for model.pretrained_path",
         _pretrain_args, _pretrain),
    Verb("pretrain-public", "train the encoders on public (synthetic or coordinator-named) sites; writes encoder.pt for "
         "model.pretrained_path", _overrides, _pretrain_public),
]
