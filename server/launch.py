"""Submitting a run to the consortium's SuperLink and following it to its end.

``flwr run --stream`` exits 0 even when the ServerApp fails, so ``launch`` submits with
``flwr run --format json`` (which returns the run id), streams ``flwr log`` for the person
watching, and takes the verdict from the run's status in ``flwr ls --run-id`` (Flower's
``finished:completed | failed | stopped``). The Hydra overrides travel in the run config key
``overrides``; they are composed here first so a typo fails before anything is submitted.

``launch`` never waits forever: the run is stopped after a deadline (``--timeout``, else one
derived from the run's config, ``default_timeout``), and a SuperLink that stops answering for
``UNREACHABLE_S`` ends the wait with a ``LaunchError`` that says how to resume the run.
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
from shared.config import ConfigError, FedmskConfig, compose

COMPLETED = "finished:completed"
UNREACHABLE_S = 30.0  # the SuperLink answering nothing this long ends the wait
STARTUP_S = 600.0  # building, shipping and starting the ServerApp, and the sites' first processes
NON_FEDMSK_TIMEOUT_S = 3600.0  # an app without fedmsk's configs/: no config to derive a deadline from


class LaunchError(ProvisionError):
    """The run could not be followed to its end (SuperLink gone, deadline passed); says how to go on."""


def default_timeout(cfg: FedmskConfig) -> float:
    """Seconds to wait for a run: every exchange may take the config's round timeout.

    An exchange is a train or an evaluation message round; a run has ``rounds`` train rounds,
    a validation round after each and before the first, and the final test round.
    """
    exchanges = 2 * cfg.rounds + 2
    return STARTUP_S + exchanges * float(cfg.strategy.round_timeout_s)


def resume_hint(consortium: Consortium, overrides: list[str], run_dir: Path | None, app_dir: Path | None = None) -> str:
    """The command that continues ``run_dir`` from its last checkpoint (the same overrides)."""
    kept = [o for o in overrides if not o.startswith(("run_dir=", "resume="))]
    app = f" --app {shlex.quote(str(app_dir))}" if app_dir is not None else ""
    return (f"restart `fedmsk server --dir {consortium.root}` if it is down, then resume from the last checkpoint: "
            f"fedmsk launch --dir {consortium.root}{app} {' '.join(shlex.quote(o) for o in kept)} resume=true run_dir={run_dir}")


def run_outcome(run_dir: Path | None) -> str | None:
    """Why the ServerApp stopped the run, from the run folder it wrote (summary.json's `stopped`)."""
    summary = run_dir / "summary.json" if run_dir is not None else None
    if summary is None or not summary.is_file():
        return None
    try:
        return json.loads(summary.read_text()).get("stopped")
    except (OSError, json.JSONDecodeError):
        return None


@dataclass
class LaunchResult:
    run_id: str
    status: str
    fab_hash: str
    run_dir: Path | None
    reason: str | None = None  # why the run stopped, when the ServerApp said so

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

        self.address = local_address
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
    unreachable_s: float | None = None,
) -> LaunchResult:
    """Submit a run, stream its log (optional) and wait for its final status.

    Raises ``LaunchError`` when the deadline passes (the run is stopped) or the SuperLink stops
    answering; both messages say how to resume.
    """
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
        import server.strategy, shared.losses, shared.models  # noqa: F401,E401 -- they register config checks
        cfg = compose(overrides, config_dir=app / "configs")
        timeout_s = default_timeout(cfg) if timeout_s is None else timeout_s
    timeout_s = NON_FEDMSK_TIMEOUT_S if timeout_s is None else timeout_s
    home = flwr_home(consortium)
    started = flwr_cli(home, "run", str(app), CONNECTION, "--run-config", overrides_config(overrides), timeout=300)
    run_id = str(started["run-id"])
    print(f"run {run_id} submitted (app build sha256 {started.get('fab-hash', '?')}…); following it "
          f"(gives up after {timeout_s:.0f} s)", flush=True)

    log_proc = None
    if stream:
        exe = Path(sys.executable).with_name("flwr")
        log_proc = subprocess.Popen(  # noqa: S603
            [str(exe) if exe.exists() else "flwr", "log", run_id, CONNECTION, "--stream"], env=flwr_env(home),
            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=home,  # its traceback when the SuperLink goes says nothing
        )
    deadline = time.monotonic() + timeout_s
    unreachable_s = UNREACHABLE_S if unreachable_s is None else unreachable_s
    status, fab_hash = "pending", ""
    watcher = RunWatcher(consortium, _local_address(home))
    silent_since: float | None = None
    try:
        while True:
            try:
                status, fab_hash = watcher.status(run_id)
                silent_since = None
            except Exception as exc:  # noqa: BLE001 - any failure to reach the Control API
                silent_since = silent_since or time.monotonic()
                if time.monotonic() - silent_since >= unreachable_s:
                    raise LaunchError(
                        f"the SuperLink at {watcher.address} stopped answering while run {run_id} was {status} "
                        f"({type(exc).__name__}: {str(exc)[:200]}); the run is lost on its side, its checkpoints are in "
                        f"{run_dir}. To go on: {resume_hint(consortium, overrides, run_dir, app_dir)}"
                    ) from None
            if status.startswith("finished"):
                break
            if time.monotonic() > deadline:
                try:
                    flwr_cli(home, "stop", run_id, CONNECTION, timeout=60)
                    stopped = "stopped it"
                except ProvisionError as exc:
                    stopped = f"could not stop it ({exc})"
                raise LaunchError(f"run {run_id} did not finish within {timeout_s:.0f} s; {stopped}. "
                                  f"Raise --timeout, or resume: {resume_hint(consortium, overrides, run_dir, app_dir)}")
            time.sleep(poll_s)
    finally:
        watcher.close()
        if log_proc is not None:
            try:
                log_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log_proc.terminate()
                log_proc.wait(timeout=10)
    return LaunchResult(run_id=run_id, status=status, fab_hash=fab_hash, run_dir=run_dir, reason=run_outcome(run_dir))
