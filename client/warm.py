"""Warm ClientApp processes at the site: one process per message, without the imports each time.

Flower 1.41 runs every message a site receives in a fresh ClientApp process: the site's executor
(``flower-superexec``, here client.approval's approving one) starts ``flwr-clientapp`` per task,
and Flower has no warm pool for ClientApps (its warm executors are Kubernetes-only and only for
agent/model/connector tasks: ``supercore/superexec/executor/factory.py``). Python, Flower,
torch, Opacus, MONAI and fedmsk's ClientApp take 10-20 s of CPU to import on a small machine,
which is most of a round when the site trains for a second or two.

``WarmLauncher`` keeps Flower's process-per-message model and removes the imports from it: a
fork server (the standard library's ``multiprocessing`` forkserver, started when the site joins)
imports those modules once, and each task is a fresh process forked from it, running the same
``client.approval.run_clientapp`` the cold path runs (approval check, Flower's own runner). A
crash, a leak or DP state in one message's process still cannot reach the next one; only the
imported, never-executed modules are shared. The fork server runs no torch op and starts no
thread, so forking it is safe.

A warm process must still run the approved build's code, not the copy the fork server
imported: ``drop_stale_modules`` (called right after the approval check, before Flower imports
the app) forgets every preloaded fedmsk module the FAB does not hold a byte-identical copy of,
so that module is imported from the FAB. Only third-party packages (torch, Flower, ...) are
always reused.
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
import os
import sys
import zipfile
from pathlib import Path

# What a fedmsk ClientApp message imports (client.secagg_app routes to client.app); the fork
# server imports them once. Flower's runner comes first: every app needs it.
PRELOAD = ("flwr.supernode.cli.flwr_clientapp", "torch", "client.approval", "client.secagg_app")
PROJECT_PACKAGES = ("cli", "client", "server", "shared", "simulation")  # fedmsk's own, shipped in the FAB
PROJECT_ROOT = Path(__file__).resolve().parent.parent
WARM_LINE = "ClientApp forked from the warm process"  # one executor log line per warm message


def _project_file(module: object) -> str | None:
    """The module's path inside the fedmsk source tree as the FAB names it (``client/app.py``)."""
    file = getattr(module, "__file__", None)
    if not file:
        return None
    try:
        return Path(file).resolve().relative_to(PROJECT_ROOT).as_posix()
    except ValueError:
        return None


def loaded_sources() -> dict[str, tuple[str, str]]:
    """module name -> (its path in the source tree, SHA-256 of the source it was imported from)."""
    out = {}
    for name, module in list(sys.modules.items()):
        if name.partition(".")[0] not in PROJECT_PACKAGES:
            continue
        rel = _project_file(module)
        if rel is not None and (PROJECT_ROOT / rel).is_file():
            out[name] = (rel, hashlib.sha256((PROJECT_ROOT / rel).read_bytes()).hexdigest())
    return out


# Taken in the fork server right after the preload: what the forked processes' modules were imported from.
_PRELOADED: dict[str, tuple[str, str]] = {}


def preload() -> None:
    """Import PRELOAD and record their sources (runs once, in the fork server)."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    from client.privacy import import_opacus

    import_opacus()  # a DP message's fork then does not import it (0.6 s of CPU each)
    _PRELOADED.update(loaded_sources())


def drop_stale_modules(fab_content: bytes) -> list[str]:
    """Forget the preloaded fedmsk packages whose code differs from the FAB's; returns them.

    A package is kept only when every one of its preloaded modules has a byte-identical copy in
    the FAB; otherwise all its modules leave ``sys.modules`` and Flower imports the FAB's.
    """
    sources = _PRELOADED or loaded_sources()
    with zipfile.ZipFile(io.BytesIO(fab_content)) as fab:
        names = set(fab.namelist())
        stale = {
            name.partition(".")[0]
            for name, (rel, digest) in sources.items()
            if rel not in names or hashlib.sha256(fab.read(rel)).hexdigest() != digest
        }
    for name in [n for n in sys.modules if n.partition(".")[0] in stale]:
        del sys.modules[name]
    if stale:
        logging.getLogger("fedmsk.approval").info(
            "this build's own %s imported (its code differs from the copy preloaded at this site)", ", ".join(sorted(stale)))
    return sorted(stale)


def _clientapp(approved: str, flower_args: list[str]) -> None:
    """A forked task process: the same runner the cold path starts with ``python -m client.approval``."""
    from client.approval import log, run_clientapp, setup_logging

    setup_logging()
    log.info("%s (pid %d)", WARM_LINE, os.getpid())
    run_clientapp(Path(approved), flower_args, after_check=drop_stale_modules)


def _noop() -> None:
    """Started once at ``WarmLauncher.start`` so the fork server imports while the site waits for work."""


class WarmProcess:
    """A forked task process with the ``poll()`` the executor's reaping expects of a Popen."""

    def __init__(self, process: multiprocessing.Process) -> None:
        self.process = process

    def poll(self) -> int | None:
        return None if self.process.is_alive() else self.process.exitcode


class WarmLauncher:
    """Starts ClientApp task processes forked from a fork server that imported ``PRELOAD``."""

    def __init__(self, approved: Path) -> None:
        self.approved = approved
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(["client.warm_preload"])

    def start(self) -> "WarmLauncher":
        warmup = self.context.Process(target=_noop, daemon=False)
        warmup.start()  # starts the fork server, which imports PRELOAD before forking this no-op
        warmup.join()
        return self

    def launch(self, flower_args: list[str]) -> WarmProcess:
        process = self.context.Process(target=_clientapp, args=(str(self.approved), list(flower_args)), daemon=False)
        process.start()
        return WarmProcess(process)
