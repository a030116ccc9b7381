"""Parameters that stay at a site (FedBN and its generalisation to any named group).

With ``strategy.local_params`` set, the server sends and aggregates only the shared
parameters; the named ones (``@norm``: every normalisation layer, as FedBN keeps each
hospital's own feature statistics; or ``fnmatch`` patterns of state-dict names such as
``net.classifier.*``) are never part of a message in either direction. Each site keeps its
own copy in ``<site>/.fedmsk/local_params/<run>.pt``: a file, not Flower's ``context.state``,
because a deployed SuperNode runs every message in a fresh ClientApp process and a restarted
site must find its values again. The first call of a run (the round-0 evaluation or round-1
training) stores the site's own initial values, so every later call of that run agrees.
The site keeps only its latest values: when the server picks an earlier round's model as the
final one, the site's test evaluation pairs it with its latest local parameters.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from torch import nn

from client.ledger import LEDGER_DIR
from shared.config import ConfigError

NORM_TOKEN = "@norm"
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*/InstanceNorm* (running statistics included)
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def local_keys(module: nn.Module, patterns: Iterable[str]) -> frozenset[str]:
    """State-dict names that ``patterns`` keep at the site; a pattern matching nothing is an error."""
    names = set(module.state_dict())
    keep: set[str] = set()
    for pattern in patterns:
        if pattern == NORM_TOKEN:
            hit = {f"{prefix}.{key}" for prefix, sub in module.named_modules() if isinstance(sub, NORM_TYPES)
                   for key in sub.state_dict()}
        else:
            hit = {n for n in names if fnmatchcase(n, pattern)}
        if not hit:
            raise ConfigError(
                f"config 'strategy.local_params': '{pattern}' names no parameter of this model; use {NORM_TOKEN} "
                f"or a pattern of its state-dict names (e.g. '{sorted(names)[0]}')"
            )
        keep |= hit
    if keep and keep == names:
        raise ConfigError("config 'strategy.local_params' keeps every parameter at the sites: nothing would be federated")
    return frozenset(keep)


def shared_part(state: Mapping[str, torch.Tensor], local: frozenset[str]) -> dict[str, torch.Tensor]:
    """The entries of ``state`` that travel."""
    return {k: v for k, v in state.items() if k not in local}


class SiteLocalParams:
    """One site's copy of its local parameters for one run."""

    def __init__(self, site_dir: str | Path, run_id: str, keys: frozenset[str]) -> None:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id or "run")
        self.path = Path(site_dir) / LEDGER_DIR / "local_params" / f"{safe}.pt"
        self.keys = keys

    def load(self) -> dict[str, torch.Tensor] | None:
        if not self.path.is_file():
            return None
        return torch.load(self.path, map_location="cpu", weights_only=True)

    def save(self, state: Mapping[str, torch.Tensor]) -> None:
        buf = io.BytesIO()
        torch.save({k: state[k].detach().cpu().clone() for k in self.keys}, buf)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        with os.fdopen(fd, "wb") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def fill(self, received: Mapping[str, torch.Tensor], fresh: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The full state dict: the server's shared parameters plus this site's local ones.

        ``fresh`` is the site's freshly built model: its values become the site's local
        parameters the first time and are stored, so that every later call of the run agrees.
        """
        stored = self.load()
        if stored is None or set(stored) != self.keys:
            stored = {k: fresh[k] for k in self.keys}
            self.save(stored)
        return {k: v for k, v in received.items() if k not in self.keys} | stored

    def keep(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Store the local part of ``state`` at the site; return what may be sent."""
        self.save(state)
        return shared_part(state, self.keys)


def site_local_params(cfg, site_dir: str | Path, run_id: str, module: nn.Module) -> SiteLocalParams | None:
    """This site's store of ``cfg.strategy.local_params`` for the run, or None when nothing stays local."""
    if not cfg.strategy.local_params:
        return None
    return SiteLocalParams(site_dir, run_id, local_keys(module, cfg.strategy.local_params))
