"""Starting Flower's SuperLink for a consortium and talking to its Control API.

The SuperLink is Flower's own (``flower-superlink``); this module only chooses its flags from
the consortium folder (server/provision.py) and drives Flower's CLI (``flwr supernode ...``)
so that people used to Flower see the same state with ``flwr ls`` / ``flwr log``:

- HTTPS with the consortium's server certificate, site authentication on, a state database
  in the consortium folder (nodes, keys, runs and logs survive a restart), and runtime
  dependency installation off (the installed fedmsk runs; nothing is installed per run).
- It listens on 127.0.0.1 only. Its single port carries the Control API (start runs, register
  keys) which has no credentials in open-source Flower, so sites reach the Fleet API through
  the gateway (server/gateway.py), never this port.
- The coordinator's Flower CLI config lives in ``<consortium>/flwr-home`` (``FLWR_HOME``) with
  one connection named ``fedmsk``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from server.provision import Consortium, ProvisionError

CONNECTION = "consortium"  # not "fedmsk": Flower reads a same-named folder holding a pyproject.toml as an app path
DEFAULT_LOCAL_PORT = 9093


def with_own_bin(env: dict[str, str] | None) -> dict[str, str]:
    """``env`` with this interpreter's bin folder first on PATH.

    Flower's daemons start their helpers by name (the SuperLink runs ``flower-superexec``, the
    executor ``flwr-clientapp``); when fedmsk runs as ``.venv/bin/fedmsk`` without the venv
    activated those names are not on PATH and the SuperLink dies at start with exit code 3.
    """
    out = dict(os.environ if env is None else env)
    own = str(Path(sys.executable).parent)
    out["PATH"] = own + os.pathsep + out.get("PATH", "")
    return out


class ManagedProcess:
    """A child process in its own process group, logging to a file, stopped with its children.

    Flower's daemons spawn helpers (the SuperLink its executor, the executor one process per
    task); a process group lets ``stop`` end all of them, and a crash of the parent test or
    command never leaves them behind when ``stop`` runs in a ``finally``.
    """

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name, self.argv, self.log_path, self.env, self.cwd = name, argv, log_path, env, cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "ManagedProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed in stop()
        self._log = log
        self.proc = subprocess.Popen(  # noqa: S603 - fixed argv built by fedmsk
            self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=with_own_bin(self.env), cwd=self.cwd, start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, needle: str, timeout: float) -> bool:
        """Wait until ``needle`` appears in the log (True) or the process exits / time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log_text():
                return True
            if not self.alive():
                return needle in self.log_text()
            time.sleep(0.2)
        return False

    def signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the whole group, then SIGKILL what is left after ``timeout`` seconds."""
        if self.proc is None:
            return
        self.signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        self.signal_group(signal.SIGKILL)  # helpers that outlived their parent
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


def flwr_home(consortium: Consortium) -> Path:
    return consortium.root / "flwr-home"


def write_connection(home: Path, address: str, ca_cert: Path, name: str = CONNECTION) -> None:
    """Write Flower's CLI config with one default connection (what `flwr ls` / `flwr run` read)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        "# Written by `fedmsk server`: the coordinator's connection to its own SuperLink.\n"
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\nroot-certificates = "{ca_cert}"\n'
    )


def flwr_env(home: Path) -> dict[str, str]:
    env = with_own_bin(None)
    env["FLWR_HOME"] = str(home)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def flwr_cli(home: Path, *args: str, timeout: float = 120.0) -> dict:
    """Run a `flwr` command with ``--format json`` against the coordinator's connection."""
    exe = Path(sys.executable).with_name("flwr")
    cmd = [str(exe) if exe.exists() else "flwr", *args, "--format", "json"]
    # cwd=home: Flower takes a connection name that is also a folder with a pyproject.toml in the
    # current directory (e.g. a `fedmsk` checkout) for an app path ("legacy usage").
    out = subprocess.run(cmd, capture_output=True, text=True, env=flwr_env(home), timeout=timeout, cwd=home)  # noqa: S603
    text = out.stdout.strip()
    start = text.find("{")
    try:
        data = json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        data = {}
    if out.returncode != 0 or not data.get("success", False):
        detail = data.get("error-message") or out.stderr.strip() or text
        raise ProvisionError(f"`flwr {' '.join(args)}` failed: {detail}")
    return data


def superlink_argv(consortium: Consortium, port: int) -> list[str]:
    exe = Path(sys.executable).with_name("flower-superlink")
    return [
        str(exe) if exe.exists() else "flower-superlink",
        "--ssl-ca-certfile", str(consortium.ca_cert),
        "--ssl-certfile", str(consortium.server_cert),
        "--ssl-keyfile", str(consortium.server_key),
        "--enable-supernode-auth",
        "--database", str(consortium.root / "state.db"),
        "--disable-runtime-dependency-installation",
        "--host", "127.0.0.1",
        "--port", str(port),
    ]


def wait_until_serving(port: int, ca_cert: Path, timeout: float = 60.0, process: ManagedProcess | None = None) -> None:
    """Wait until the SuperLink answers HTTPS on 127.0.0.1:port (any HTTP status counts)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise ProvisionError(f"the SuperLink exited with code {process.returncode()}; see {process.log_path}")
        try:
            httpx.get(f"https://127.0.0.1:{port}/", verify=str(ca_cert), timeout=2.0)
            return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise ProvisionError(f"the SuperLink did not answer on 127.0.0.1:{port} within {timeout:.0f} s")


def node_states(home: Path) -> dict[int, str]:
    """node id -> Flower's status (registered | online | offline | unregistered)."""
    nodes = flwr_cli(home, "supernode", "list", CONNECTION, "--verbose")["nodes"]
    return {int(n["node-id"]): n["status"] for n in nodes}


def sync_site_keys(consortium: Consortium, home: Path) -> list[str]:
    """Make the running SuperLink's registered keys match sites.json; returns what changed.

    Registers every site that is not revoked and has no node yet; unregisters revoked sites
    whose node is still registered (a revocation done while the server was down).
    """
    changes = []
    states = node_states(home)
    for name, rec in consortium.sites().items():
        state = states.get(rec.node_id) if rec.node_id is not None else None
        if rec.revoked:
            if state is not None and state != "unregistered":
                flwr_cli(home, "supernode", "unregister", str(rec.node_id), CONNECTION)
                changes.append(f"unregistered revoked site {name}")
            continue
        if state is None:
            data = flwr_cli(home, "supernode", "register", str(consortium.site_pub(name)), CONNECTION, "--name", name)
            consortium.mark_registered(name, int(data["node-id"]))
            changes.append(f"registered {name} ({rec.fingerprint})")
    return changes


def revoke_site(consortium: Consortium, name: str, home: Path) -> str:
    """Unregister a site at the running server and mark it revoked; say what happened."""
    rec = consortium.site(name)
    consortium.mark_revoked(name)
    if rec.node_id is None:
        return f"site {name} was never registered; marked revoked (`fedmsk server` will not register it)"
    try:
        flwr_cli(home, "supernode", "unregister", str(rec.node_id), CONNECTION, timeout=30)
    except ProvisionError as exc:
        return (
            f"site {name} marked revoked; the server could not be reached ({exc}); "
            "`fedmsk server` unregisters it at its next start"
        )
    return (
        f"site {name} (node {rec.node_id}) unregistered. Flower never re-registers a revoked key: "
        f"to let the site back in, issue a new pair with `fedmsk certs add-site {name} --rotate`"
    )


class CoordinatorServer:
    """The SuperLink (local port) plus the gateway (site-facing address), started and stopped together.

    Use as a context manager; ``__exit__`` stops both, so a test or a Ctrl-C never leaves a
    SuperLink, its executor or nginx behind.
    """

    def __init__(self, consortium: Consortium, *, local_port: int = DEFAULT_LOCAL_PORT, bind_host: str = "0.0.0.0",
                 public_port: int | None = None, gateway: bool = True) -> None:
        consortium.require()
        self.consortium = consortium
        self.local_port = local_port
        self.bind_host = bind_host
        self.public_port = public_port or int(consortium.info().public_address.rpartition(":")[2])
        self.use_gateway = gateway
        self.home = flwr_home(consortium)
        self.superlink: ManagedProcess | None = None
        self.gateway: ManagedProcess | None = None
        self.changes: list[str] = []

    def start(self) -> "CoordinatorServer":
        from server.gateway import gateway_process

        logs = self.consortium.root / "logs"
        write_connection(self.home, f"127.0.0.1:{self.local_port}", self.consortium.ca_cert)
        env = flwr_env(self.home)
        env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = env.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
        self.superlink = ManagedProcess("superlink", superlink_argv(self.consortium, self.local_port), logs / "superlink.log",
                                        env=env, cwd=self.consortium.root).start()
        try:
            wait_until_serving(self.local_port, self.consortium.ca_cert, process=self.superlink)
            self.changes = sync_site_keys(self.consortium, self.home)
            if self.use_gateway:
                self.gateway = gateway_process(self.consortium, listen_host=self.bind_host, listen_port=self.public_port,
                                               upstream_port=self.local_port).start()
                _wait_for_port(self.bind_host, self.public_port, self.gateway)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for proc in (self.gateway, self.superlink):
            if proc is not None:
                proc.stop()

    def __enter__(self) -> "CoordinatorServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_for_port(host: str, port: int, process: ManagedProcess, timeout: float = 20.0) -> None:
    import socket

    target = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            raise ProvisionError(f"{process.name} exited with code {process.returncode()}: {process.log_text()[-2000:]}")
        try:
            with socket.create_connection((target, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise ProvisionError(f"{process.name} does not listen on {target}:{port} after {timeout:.0f} s; see {process.log_path}")
