"""A server optimiser's state, checkpointed beside each round's model.

FedAdam / FedYogi / FedAdagrad (Flower's ``FedOpt`` family) keep first and second moments
(``m_t``, ``v_t``) of the averaged update between rounds. A resumed run that restarted them at
zero would take a different (and, with Adam's bias correction at a late round, much larger)
step than the uninterrupted run. Flower does not persist them, so fedmsk writes them to
``checkpoints/round_NNNN.strategy.npz`` before the round's model checkpoint is marked
latest, and loads them back on resume. Strategies without state write nothing.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.fedopt import FedOpt

from shared.atomic import atomic_write_bytes

MOMENTS = ("m_t", "v_t")


def _inner(strategy: Strategy) -> Strategy:
    """The strategy doing the arithmetic (through wrappers such as the DP clipping one)."""
    while hasattr(strategy, "strategy") and isinstance(strategy.strategy, Strategy):
        strategy = strategy.strategy
    return strategy


def state_path(run_dir: Path, rnd: int) -> Path:
    return run_dir / "checkpoints" / f"round_{rnd:04d}.strategy.npz"


def save_strategy_state(run_dir: Path, rnd: int, strategy: Strategy) -> Path | None:
    """Write the optimiser moments after round ``rnd``; None for a stateless strategy."""
    inner = _inner(strategy)
    if not isinstance(inner, FedOpt):
        return None
    arrays = {f"{name}/{key}": value for name in MOMENTS for key, value in (getattr(inner, name) or {}).items()}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path = state_path(run_dir, rnd)
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_strategy_state(run_dir: Path, rnd: int, strategy: Strategy) -> bool:
    """Restore the moments saved after round ``rnd``; False when there is nothing to restore.

    A FedOpt strategy resumed from a round whose state file is missing is an error: going on
    with fresh moments would silently change the optimisation.
    """
    inner = _inner(strategy)
    if not isinstance(inner, FedOpt):
        return False
    path = state_path(run_dir, rnd)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: the server optimiser state of round {rnd} is missing, so {type(inner).__name__} cannot resume "
            f"exactly; start a new run, or resume with the strategy the run was started with"
        )
    with np.load(path, allow_pickle=False) as data:
        for name in MOMENTS:
            moments = {key.split("/", 1)[1]: data[key] for key in data.files if key.startswith(f"{name}/")}
            setattr(inner, name, moments or None)
    return True
