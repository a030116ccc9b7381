"""Submitting a run to the consortium's SuperLink and following it to its end.

``flwr run --stream`` exits 0 even when the ServerApp fails, so ``launch`` submits with
``flwr run --format json`` (which returns the run id), streams ``flwr log`` for the person
watching, and takes the verdict from the run's status in ``flwr ls --run-id`` (Flower's
``finished:completed | failed | stopped``). The Hydra overrides travel in the run config key
``overrides``; they are composed here first so a typo fails before anything is submitted.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from server.provision import Consortium, ProvisionError
from server.superlink import CONNECTION, flwr_cli, flwr_env, flwr_home
from shared.config import ConfigError, compose

COMPLETED = "finished:completed"


@dataclass
class LaunchResult:
    run_id: str
    status: str
    fab_hash: str
    run_dir: Path | None

    @property
    def ok(self) -> bool:
        return self.status == COMPLETED


def default_app_dir() -> Path:
    """The fedmsk source folder (the Flower app `flwr run` builds and ships)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise ConfigError("cannot find the fedmsk source folder (pyproject.toml); pass --app /path/to/fedmsk")
    return root


def check_app(app_dir: Path) -> None:
    """Refuse an app whose pyproject `flwr run` would rewrite.

    Flower migrates a ``[tool.flwr.federations]`` table out of pyproject.toml (commenting it
    out) on the first ``flwr run``; that edits the source and changes the build's SHA-256, so the
    build the sites approved would no longer be the one sent.
    """
    from flwr.cli.config_migration import _is_migratable

    migratable, _ = _is_migratable(app_dir)
    if migratable:
        raise ConfigError(
            f"{app_dir / 'pyproject.toml'} has a [tool.flwr.federations] table: `flwr run` would rewrite the file and "
            "change the build's hash that sites approved. Move connections to $FLWR_HOME/config.toml and delete the table."
        )


def overrides_config(overrides: list[str]) -> str:
    """The `flwr run --run-config` value carrying the overrides (a TOML string the ServerApp shlex-splits)."""
    return "overrides=" + json.dumps(" ".join(shlex.quote(o) for o in overrides))


class RunWatcher:
    """Reads a run's status through Flower's own Control API client, in process.

    Polling with `flwr ls` would start a Python interpreter every few seconds, which on a small
    coordinator machine costs more CPU than the run's own ServerApp.
    """

    def __init__(self, consortium: Consortium, local_address: str) -> None:
        from flwr.cli.typing import SuperLinkConnection
        from flwr.cli.utils import init_http_client_from_connection

        conn = SuperLinkConnection(name=CONNECTION, address=local_address, root_certificates=str(consortium.ca_cert))
        self.client = init_http_client_from_connection(conn)

    def status(self, run_id: str) -> tuple[str, str]:
        """(status as `flwr ls` prints it, e.g. finished:completed; the build's SHA-256)."""
        from flwr.common.serde import run_from_proto
        from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=no-name-in-module

        res = self.client.ListRuns(ListRunsRequest(run_id=int(run_id)))
        run = run_from_proto(next(iter(res.run_dict.values())))
        status = f"{run.status.status}:{run.status.sub_status}" if run.status.sub_status else run.status.status
        return status, run.fab_hash

    def close(self) -> None:
        self.client.close()


def _local_address(home: Path) -> str:
    import tomllib

    return tomllib.loads((home / "config.toml").read_text())["superlink"][CONNECTION]["address"]


def launch(
    consortium: Consortium,
    overrides: list[str],
    *,
    app_dir: Path | None = None,
    stream: bool = True,
    poll_s: float = 2.0,
    timeout_s: float | None = None,
) -> LaunchResult:
    """Submit a run, stream its log (optional) and wait for its final status."""
    consortium.require()
    app = (app_dir or default_app_dir()).resolve()
    check_app(app)
    overrides = list(overrides)
    run_dir = None
    if not any(o.startswith("run_dir=") for o in overrides):
        run_dir = consortium.root / "runs" / time.strftime("run-%Y%m%d-%H%M%S")
        overrides.append(f"run_dir={run_dir}")
    else:
        run_dir = Path(next(o for o in overrides if o.startswith("run_dir=")).split("=", 1)[1])
    if (app / "configs" / "config.yaml").is_file():  # a fedmsk app: fail here, not in the ServerApp, on a wrong key
        compose(overrides, config_dir=app / "configs")
    home = flwr_home(consortium)
    started = flwr_cli(home, "run", str(app), CONNECTION, "--run-config", overrides_config(overrides), timeout=300)
    run_id = str(started["run-id"])
    print(f"run {run_id} submitted (app build sha256 {started.get('fab-hash', '?')}…); following it", flush=True)

    log_proc = None
    if stream:
        exe = Path(sys.executable).with_name("flwr")
        log_proc = subprocess.Popen(  # noqa: S603
            [str(exe) if exe.exists() else "flwr", "log", run_id, CONNECTION, "--stream"], env=flwr_env(home),
            stdin=subprocess.DEVNULL, cwd=home,
        )
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    status, fab_hash = "pending", ""
    watcher = RunWatcher(consortium, _local_address(home))
    try:
        while True:
            status, fab_hash = watcher.status(run_id)
            if status.startswith("finished"):
                break
            if deadline is not None and time.monotonic() > deadline:
                flwr_cli(home, "stop", run_id, CONNECTION)
                raise ProvisionError(f"run {run_id} did not finish within {timeout_s:.0f} s; stopped it")
            time.sleep(poll_s)
    finally:
        watcher.close()
        if log_proc is not None:
            try:
                log_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log_proc.terminate()
                log_proc.wait(timeout=10)
    return LaunchResult(run_id=run_id, status=status, fab_hash=fab_hash, run_dir=run_dir)
