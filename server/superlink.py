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
- The executor (Flower's ``flower-superexec``, which starts one ServerApp process per run) is
  started by fedmsk, not by the SuperLink (``--isolation process``): the SuperLink never notices
  that its own subprocess died, and a run submitted after that stays pending for good.
  ``CoordinatorServer.supervise`` watches the SuperLink, the executor and the gateway, names a
  death and restarts the child (at most ``MAX_RESTARTS`` times), or gives up (non-zero exit).

"database is locked" (found reading Flower 1.41's ``supercore/sql_mixin.py`` and the SQL
object store): every connection already runs WAL with ``busy_timeout=5000`` (Flower's
``SQLITE_PRAGMAS``), and every write of the SuperLink (run and task state, and the object store
that holds each message's weights, one statement per object inside one transaction) goes
through SQLite's single writer lock on ``state.db``. When a writer holds it for more than 5 s -- a
message's object tree being stored while the SuperLink's threads fight for 2 busy cores -- the
next writer, e.g. ``claim_task`` behind the executor's ``acquire-task``, gets "database is
locked", the SuperLink answers HTTP 500 and Flower's executor dies of the unhandled error.
WAL cannot help (there is one writer at a time by design), the busy timeout can: the SuperLink
runs through this module (``python -m server.superlink``), which raises it to
``BUSY_TIMEOUT_MS`` before Flower opens the database; and a dying executor is restarted anyway.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from server.provision import Consortium, ProvisionError

CONNECTION = "consortium"  # not "fedmsk": Flower reads a same-named folder holding a pyproject.toml as an app path
DEFAULT_LOCAL_PORT = 9093
BUSY_TIMEOUT_MS = 60_000  # SQLite waits this long for the writer lock (Flower's own default: 5000)
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Flower colours its log levels
MAX_RESTARTS = 3  # per child, over the server's lifetime; then `fedmsk server` gives up (exit 1)


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
        self.log_offset = 0  # where this start's output begins in the (appended) log file

    def start(self) -> "ManagedProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
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
        """This start's output only: the file keeps earlier starts' history, whose causes are not this one's."""
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as fh:
            fh.seek(self.log_offset)
            return fh.read().decode(errors="replace")

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
        """SIGTERM the whole group, then SIGKILL what is left after ``timeout`` seconds.

        A second Ctrl-C or SIGTERM while waiting (``timeout`` sends one to the child and one to
        its process group) cuts the wait short instead of leaving the child running.
        """
        if self.proc is None:
            return
        self.signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            pass
        self.signal_group(signal.SIGKILL)  # helpers that outlived their parent
        try:
            self.proc.wait(timeout=5)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            pass
        self._log.close()


def quiet_flower_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with Flower's telemetry and update check off, for every process fedmsk starts.

    Flower 1.41 posts a telemetry event to telemetry.flower.ai when each of its processes starts
    and exits (a ClientApp: once per message) and waits up to 4 s for it at exit; where outbound
    traffic is dropped rather than refused, that is 4 s per message. Hospitals and the
    coordinator should not phone home in any case.
    """
    env = dict(env)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    return env


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
    env = quiet_flower_env(with_own_bin(None))
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


def superlink_argv(consortium: Consortium, port: int, secret: Path) -> list[str]:
    """Flower's SuperLink, run through this module's ``__main__`` (longer SQLite busy timeout)."""
    return [
        sys.executable, "-m", "server.superlink",
        "--ssl-ca-certfile", str(consortium.ca_cert),
        "--ssl-certfile", str(consortium.server_cert),
        "--ssl-keyfile", str(consortium.server_key),
        "--enable-supernode-auth",
        "--database", str(consortium.root / "state.db"),
        "--disable-runtime-dependency-installation",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--isolation", "process",  # fedmsk starts and watches the executor (executor_argv)
        "--superexec-auth-secret-file", str(secret),
    ]


def executor_argv(consortium: Consortium, port: int, secret: Path) -> list[str]:
    """Flower's executor for the coordinator: takes each run's ServerApp task from the SuperLink."""
    exe = Path(sys.executable).with_name("flower-superexec")
    return [
        str(exe) if exe.exists() else "flower-superexec",
        "--root-certificates", str(consortium.ca_cert),
        "--runtime-api-address", f"127.0.0.1:{port}",
        "--superexec-auth-secret-file", str(secret),
    ]


def write_secret(path: Path) -> Path:
    """A fresh shared secret (0600) that the executor proves itself to the SuperLink with."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(os.urandom(32).hex().encode())
    return path


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


class ServerDied(ProvisionError):
    """A child of `fedmsk server` died more often than it may be restarted."""


class CoordinatorServer:
    """The SuperLink (local port), its executor and the gateway (site-facing address), started,
    watched and stopped together.

    Use as a context manager; ``__exit__`` stops all of them, so a test or a Ctrl-C never leaves a
    SuperLink, its executor or nginx behind.
    """

    def __init__(self, consortium: Consortium, *, local_port: int = DEFAULT_LOCAL_PORT, bind_host: str = "0.0.0.0",
                 public_port: int | None = None, gateway: bool = True, max_restarts: int = MAX_RESTARTS) -> None:
        consortium.require()
        self.consortium = consortium
        self.local_port = local_port
        self.bind_host = bind_host
        self.public_port = public_port or int(consortium.info().public_address.rpartition(":")[2])
        self.use_gateway = gateway
        self.max_restarts = max_restarts
        self.home = flwr_home(consortium)
        self.logs = consortium.root / "logs"
        self.secret = consortium.root / "superexec.secret"
        self.superlink: ManagedProcess | None = None
        self.executor: ManagedProcess | None = None
        self.gateway: ManagedProcess | None = None
        self.changes: list[str] = []
        self.restarts: dict[str, int] = {}

    def _env(self) -> dict[str, str]:
        env = flwr_env(self.home)
        env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
        return env

    def _start_superlink(self) -> None:
        self.superlink = ManagedProcess("SuperLink", superlink_argv(self.consortium, self.local_port, self.secret),
                                        self.logs / "superlink.log", env=self._env(), cwd=self.consortium.root).start()
        wait_until_serving(self.local_port, self.consortium.ca_cert, process=self.superlink)

    def _start_executor(self) -> None:
        self.executor = ManagedProcess("executor (SuperExec)", executor_argv(self.consortium, self.local_port, self.secret),
                                       self.logs / "superexec.log", env=self._env(), cwd=self.consortium.root).start()

    def _start_gateway(self) -> None:
        from server.gateway import gateway_process

        self.gateway = gateway_process(self.consortium, listen_host=self.bind_host, listen_port=self.public_port,
                                       upstream_port=self.local_port).start()
        _wait_for_port(self.bind_host, self.public_port, self.gateway)

    def start(self) -> "CoordinatorServer":
        write_connection(self.home, f"127.0.0.1:{self.local_port}", self.consortium.ca_cert)
        write_secret(self.secret)
        try:
            self._start_superlink()
            self._start_executor()
            self.changes = sync_site_keys(self.consortium, self.home)
            if self.use_gateway:
                self._start_gateway()
        except BaseException:
            self.stop()
            raise
        return self

    def children(self) -> list[ManagedProcess]:
        return [p for p in (self.superlink, self.executor, self.gateway) if p is not None]

    def supervise(self) -> list[str]:
        """Check every child once: name each that died and restart it; returns what happened.

        A dead SuperLink takes its executor with it (the executor's connection is to that
        SuperLink), so both restart; the run that was going on is failed by Flower and can be
        resumed (`fedmsk launch ... resume=true run_dir=...`). Raises ``ServerDied`` once a
        child has died more than ``max_restarts`` times.
        """
        events = []
        restarts = {"superlink": self._restart_superlink, "executor": self._start_executor, "gateway": self._start_gateway}
        for attr, restart in restarts.items():
            proc = getattr(self, attr)
            if proc is None or proc.alive():
                continue
            code = proc.returncode()
            lines = [ANSI.sub("", line).strip().rstrip(".") for line in proc.log_text().splitlines()[-3:]]
            tail = " | ".join(line for line in lines if line)
            what = f"{proc.name} died (exit code {code}); its log {proc.log_path} ends: {tail[-400:]}"
            proc.stop(timeout=2)
            count = self.restarts.get(proc.name, 0) + 1
            self.restarts[proc.name] = count
            if count > self.max_restarts:
                raise ServerDied(f"{what}. It died {count} times; giving up (the other children are stopped)")
            restart()
            events.append(f"{what}. Restarted it ({count}/{self.max_restarts}).")
            if attr == "superlink":
                break  # the executor was restarted with it
        return events

    def _restart_superlink(self) -> None:
        if self.executor is not None:
            self.executor.stop(timeout=2)
        self._start_superlink()
        self._start_executor()

    def stop(self) -> None:
        for proc in (self.gateway, self.executor, self.superlink):
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


def _run_superlink(argv: list[str]) -> None:
    """``flower-superlink`` with SQLite's busy timeout raised to BUSY_TIMEOUT_MS (see the module docstring)."""
    import flwr.supercore.sql_mixin as sql_mixin
    from flwr.superlink.cli import flower_superlink

    sql_mixin.SQLITE_PRAGMAS = tuple(
        (name, str(BUSY_TIMEOUT_MS) if name == "busy_timeout" else value) for name, value in sql_mixin.SQLITE_PRAGMAS
    )
    sys.argv = ["flower-superlink", *argv]
    flower_superlink()


if __name__ == "__main__":
    _run_superlink(sys.argv[1:])
