"""`fedmsk pretrain`: federated self-supervised or cross-modal pretraining of a task's encoders.

A pretraining job is an ordinary federated run whose config sets ``pretrain.objective``
(shared.ssl): the same ServerApp (round loop, FedAvg, update checks, checkpoints) and ClientApp
(site data, DP-SGD with the site's ledger) run it, so a deployment runs it with
``fedmsk launch pretrain=ssl ...`` exactly as this simulation does. The ServerApp keeps the
encoders of the final model as ``encoder.pt`` with ``encoder_card.json`` (objective, data,
sites, rounds, epsilon per site, code version: shared.provenance.write_pretrained), which any
task's ``model.pretrained_path`` loads.

Here every site folder under ``data_root`` is a simulated hospital, through Flower's simulation
engine (``grid=None``) or, for tests and benchmarks, any Flower ``Grid`` the caller gives (e.g.
the in-process one of tests/inprocess_grid.py, which skips Ray's start-up).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

from flwr.serverapp import Grid
from rich.console import Console

from client.site import list_sites
from server.app import default_run_dir, make_server_app
from shared.config import ConfigError, FedmskConfig
from shared.provenance import CARD, WEIGHTS


def run_federated_pretrain(cfg: FedmskConfig, grid: Grid | None = None, console: Console | None = None) -> Path:
    """Federate ``cfg.pretrain.objective`` over the sites of ``cfg.data_root``; return the encoder weights file.

    Raises ConfigError without an objective, ``server.federation.RunStopped`` when a round has no
    accepted update (nobody trained: no weights are written).
    """
    from simulation.runner import backend_config, check_minimums

    if cfg.pretrain.objective == "none":
        raise ConfigError("fedmsk pretrain needs an objective: objective=ssl or objective=crossmodal (pretrain=<name>)")
    console = console or Console()
    sites = list_sites(cfg.data_root)
    check_minimums(cfg, len(sites))
    run_dir = default_run_dir(cfg, "pretrain").resolve()
    cfg.data_root = str(Path(cfg.data_root).resolve())  # the site processes resolve it themselves
    p = cfg.pretrain
    console.print(f"[bold]fedmsk pretrain[/]: objective {p.objective} "
                  f"({p.ssl_loss if p.objective == 'ssl' else 'negatives ' + p.negatives}), {len(sites)} sites "
                  f"({', '.join(s.name for s in sites)}), encoders of {cfg.model.name}, {cfg.rounds} rounds x "
                  f"{cfg.federation.local_epochs} local epochs -> {run_dir}")
    server_app = make_server_app(cfg, run_dir, on_progress=lambda text: console.print("  " + text))
    if grid is not None:
        from flwr.app import Context, RecordDict

        server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    else:
        from flwr.simulation import run_simulation

        from client.secagg_app import app as client_app

        logging.getLogger("flwr").setLevel(logging.WARNING)
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(sites),
                           backend_config=backend_config(cfg))
    weights = run_dir / WEIGHTS
    if not weights.is_file():
        raise RuntimeError(f"the pretraining run ended without {weights}; see {run_dir / 'events.jsonl'} and the log above")
    card = json.loads((run_dir / CARD).read_text())
    for site, row in card["sites"].items():
        eps = "no DP" if row["epsilon"] is None else f"epsilon {row['epsilon']:.2f}"
        console.print(f"  {site}: {row['patients']} patients, {row['rounds_trained']} rounds, {eps}")
    losses = ", ".join(f"{r}: {v:.3f}" for r, v in card["val_loss_by_round"] if v is not None)
    console.print(f"validation loss by round: {losses}")
    scale = card["feature_scale"]
    console.print(f"image encoder's largest activation on public noise images: {scale['init']:.3g} at the start, "
                  f"{scale['final']:.3g} now ({scale['ratio']:.2g}x)")
    if "warning" in scale:
        console.print(f"[yellow]warning[/]: {scale['warning']}")
    console.print(f"wrote {weights} ({', '.join(card['encoders'])} encoders); fine-tune from it with\n"
                  f"  model.pretrained_path={weights} [model.finetune=all|heads|norm_heads]")
    return weights
