"""A hospital joins the federation: Flower's SuperNode plus the site's approving executor.

``fedmsk join <bundle>`` reads the bundle the coordinator issued (server/provision.py):
``join.yaml`` (server address, file names), ``ca.crt``, ``site.key`` and ``site.yaml`` (the
site's own settings). It starts two Flower processes and keeps them together:

- ``flower-supernode`` with TLS (``--root-certificates ca.crt``), the site's key
  (``--auth-supernode-private-key``), ``--isolation process`` and the node config the
  ClientApp reads (``site-name``, ``site-config``, ``privacy-config`` and optionally
  ``data-dir`` / ``device``);
- the executor, Flower's ``flower-superexec`` wrapped by client/approval.py so that only app
  builds approved at this site are installed and run.

The Runtime API between the two listens on 127.0.0.1 only and the executor proves itself
with a per-start shared secret (``--superexec-auth-secret-file``).

What a round costs at the site beyond its training (bench/bench_deploy.py measures it): the
SuperNode runs through client.supernode (Flower's poll and heartbeat intervals, hard-coded in
Flower 1.41, set to the site's ``Intervals``), and the executor forks each message's ClientApp
from a process that imported it once (client.warm) instead of starting Python, torch and
fedmsk again per message. Both processes run with Flower's telemetry and update check off: a
hospital's node sends nothing to flower.ai, and a blocked outbound network never holds a
ClientApp's exit (Flower waits up to 4 s for its telemetry event).
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from client.approval import ApprovedBuilds
from client.supernode import HEARTBEAT_S, POLL_S, REPLY_POLL_S
from server.superlink import ManagedProcess, quiet_flower_env
from shared.config import ConfigError, load_site_file

# Why a SuperNode stopped, in the site operator's words: (text in Flower's log, meaning).
EXIT_REASONS = (
    ("[code: 2004]", "the server refused this site's key (never registered, or revoked); ask your coordinator "
                     "(a revoked site needs a new key: `fedmsk certs add-site NAME --rotate`)"),
    ("CERTIFICATE_VERIFY_FAILED", "the server's TLS certificate does not verify against the bundle's ca.crt "
                                  "(wrong CA, or someone in between); check ca.crt with your coordinator"),
    ("Exit Code: 305", "could not connect to the server; check the address in join.yaml and your network"),
    ("Exit Code: 302", "the site key is not a valid ECDSA P-384 OpenSSH key; ask your coordinator for a new bundle"),
)
REVOKED = ("this site's key was revoked by the coordinator (the server no longer accepts it); ask your coordinator "
           "for a new bundle (`fedmsk certs add-site NAME --rotate`)")
GRACEFUL = "SuperNode terminated gracefully"


def key_refused(settings: "JoinSettings", node_id: int) -> bool | None:
    """Ask the server whether it still accepts this site's key (None: the server cannot be reached).

    Flower's SuperNode answers a 401 from the SuperLink (its key is no longer registered) by
    sending itself SIGINT and logging only "terminated gracefully", exit code 0. One signed Fleet
    request as that node tells the cases apart: the SuperLink's node authentication
    (``superlink/routers/fleet/node_auth.py``) answers 401 only when the key no longer maps to
    the node id; a registered key gets past it (to a harmless "no such run").
    """
    import httpx
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.proto.run_pb2 import GetRunRequest  # pylint: disable=no-name-in-module
    from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    key = load_ssh_private_key(settings.private_key.read_bytes(), None)
    with FleetHttpClient.from_server_address(
        settings.superlink, False, str(settings.ca_certificate),
        interceptors=[NodeAuthHttpInterceptor(key, key.public_key())],
    ) as client:
        try:
            client.GetRun(GetRunRequest(node=Node(node_id=node_id), run_id=0))
        except httpx.HTTPStatusError as exc:
            return exc.response.status_code == httpx.codes.UNAUTHORIZED
        except httpx.HTTPError:
            return None
    return False


@dataclass(frozen=True)
class Intervals:
    """How a site's processes wait (client.supernode explains each and its cost).

    ``warm``: fork each ClientApp from a process that imported it (client.warm); False runs
    Flower's own fresh interpreter per message.
    """

    poll_s: float = POLL_S
    reply_poll_s: float = REPLY_POLL_S
    heartbeat_s: float = HEARTBEAT_S
    warm: bool = True
    task_poll_s: float = 0.2  # the executor's wait between two task requests (Flower: 1 s)

    def check(self) -> None:
        """Refuse values Flower's SuperLink would refuse or that make no sense (before anything starts)."""
        from flwr.common.constant import HEARTBEAT_MAX_INTERVAL, HEARTBEAT_MIN_INTERVAL

        if not HEARTBEAT_MIN_INTERVAL <= self.heartbeat_s <= HEARTBEAT_MAX_INTERVAL:
            raise ConfigError(f"--heartbeat-s {self.heartbeat_s}: the server accepts {HEARTBEAT_MIN_INTERVAL}-{HEARTBEAT_MAX_INTERVAL} s")
        if not (0 < self.poll_s <= 60 and 0 < self.reply_poll_s <= 60):
            raise ConfigError(f"--poll-s {self.poll_s}: use seconds in (0, 60]")

    @classmethod
    def flower(cls) -> "Intervals":
        """Flower 1.41's own behaviour (bench/bench_deploy.py --stock)."""
        return cls(poll_s=3.0, reply_poll_s=0.5, heartbeat_s=30.0, warm=False, task_poll_s=1.0)


@dataclass(frozen=True)
class JoinSettings:
    """A site's join.yaml with every path made absolute."""

    site: str
    superlink: str
    ca_certificate: Path
    private_key: Path
    site_config: Path
    privacy_policy: Path | None
    runtime_port: int
    approved_builds: Path
    folder: Path


def load_join(path: str | Path) -> JoinSettings:
    """Read a bundle folder (holding join.yaml) or a join.yaml file; check that its files exist."""
    p = Path(path).expanduser().resolve()
    file = p / "join.yaml" if p.is_dir() else p
    if not file.is_file():
        raise ConfigError(f"{p}: no join.yaml; pass the site bundle folder your coordinator sent (it holds join.yaml)")
    raw = yaml.safe_load(file.read_text()) or {}
    need = ("site", "superlink", "ca_certificate", "private_key", "site_config")
    missing = [k for k in need if not raw.get(k)]
    if missing:
        raise ConfigError(f"{file}: missing {', '.join(missing)}; re-issue the bundle with `fedmsk certs add-site`")
    unknown = set(raw) - {*need, "runtime_port", "approved_builds", "privacy_policy"}
    if unknown:
        raise ConfigError(f"{file}: unknown keys {sorted(unknown)}")
    folder = file.parent

    def resolve(key: str, default: str | None = None) -> Path:
        return (folder / str(raw.get(key) or default)).resolve()

    settings = JoinSettings(
        site=str(raw["site"]), superlink=str(raw["superlink"]),
        ca_certificate=resolve("ca_certificate"), private_key=resolve("private_key"), site_config=resolve("site_config"),
        privacy_policy=resolve("privacy_policy") if raw.get("privacy_policy") else None,
        runtime_port=int(raw.get("runtime_port") or 9094), approved_builds=resolve("approved_builds", "approved-builds.json"),
        folder=folder,
    )
    for key in ("ca_certificate", "private_key", "site_config", "privacy_policy"):
        if getattr(settings, key) is not None and not getattr(settings, key).is_file():
            raise ConfigError(f"{file}: {key} '{getattr(settings, key)}' does not exist")
    mode = settings.private_key.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{settings.private_key} is readable by other users; run `chmod 600 {settings.private_key}`")
    return settings


def node_config(settings: JoinSettings, data_dir: str | None = None, device: str | None = None) -> str:
    """The SuperNode's --node-config string; the ClientApp reads these keys (client/site.py)."""
    site = load_site_file(settings.site_config)
    data = data_dir or site.data_dir
    if not data or str(data).startswith("/path/to/"):
        raise ConfigError(f"{settings.site_config}: set data_dir to the folder holding your clinical.csv and images/")
    if not (Path(data) / "clinical.csv").is_file():
        raise ConfigError(f"{settings.site_config}: data_dir '{data}' holds no clinical.csv; check the path (`fedmsk check {data}`)")
    pairs = {"site-name": settings.site, "site-config": str(settings.site_config)}
    if settings.privacy_policy is not None:
        from client.privacy import NODE_PRIVACY_CONFIG, load_policy_file

        load_policy_file(settings.privacy_policy)  # a broken policy fails here, not at round 1
        pairs[NODE_PRIVACY_CONFIG] = str(settings.privacy_policy)
    if data_dir:
        pairs["data-dir"] = str(Path(data_dir).resolve())
    if device:
        pairs["device"] = device
    for key, value in pairs.items():
        if '"' in value:
            raise ConfigError(f"node config value for {key} must not contain a double quote: {value}")
    return " ".join(f'{k}="{v}"' for k, v in pairs.items())


class SiteNode:
    """The SuperNode and the approving executor of one site, started and stopped together."""

    def __init__(self, settings: JoinSettings, *, data_dir: str | None = None, device: str | None = None,
                 state_dir: Path | None = None, max_retries: int | None = None, runtime_port: int | None = None,
                 intervals: Intervals | None = None) -> None:
        if runtime_port is not None:  # several sites on one machine (tests, demos) need distinct ports
            settings = replace(settings, runtime_port=runtime_port)
        self.settings = settings
        self.node_config = node_config(settings, data_dir, device)
        self.state_dir = (state_dir or settings.folder / "state").resolve()
        self.max_retries = max_retries
        self.intervals = intervals or Intervals()
        self.supernode: ManagedProcess | None = None
        self.executor: ManagedProcess | None = None
        self.stopped_by_us = False  # Ctrl-C / SIGTERM / stop(): not a failure
        self._lock_fd: int | None = None

    def _take_lock(self) -> None:
        """Hold ``state/join.lock`` while this site runs: a second join from the same folder is refused.

        Two SuperNodes of one site sharing a state folder would rewrite each other's Runtime API
        secret and interleave their logs (the running one's failures then read as the new one's).
        The lock is an flock on a close-on-exec descriptor: the children do not hold it, and it
        goes with this process however it ends.
        """
        path = self.state_dir / "join.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(
                f"site '{self.settings.site}' is already joined from {self.state_dir} (pid {holder}); "
                f"stop that `fedmsk join` first (one join per site bundle)") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _env(self) -> dict[str, str]:
        env = quiet_flower_env(dict(os.environ))
        env["FLWR_HOME"] = str(self.state_dir / "flwr-home")  # where approved builds get installed
        env["PYTHONUNBUFFERED"] = "1"
        env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(self.intervals.task_poll_s)
        return env

    def start(self) -> "SiteNode":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> "SiteNode":
        s = self.settings
        secret = self.state_dir / "superexec.secret"
        if secret.exists():
            secret.unlink()
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(os.urandom(32).hex().encode())
        if not s.approved_builds.exists():
            ApprovedBuilds(s.approved_builds)._save({})  # an empty allow-list: nothing runs until approved
        runtime = f"127.0.0.1:{s.runtime_port}"
        i = self.intervals
        argv = [
            sys.executable, "-m", "client.supernode",
            "--poll-s", str(i.poll_s), "--reply-poll-s", str(i.reply_poll_s), "--heartbeat-s", str(i.heartbeat_s),
            "--superlink", s.superlink,
            "--root-certificates", str(s.ca_certificate),
            "--auth-supernode-private-key", str(s.private_key),
            "--isolation", "process",
            "--host", "127.0.0.1", "--port", str(s.runtime_port),
            "--superexec-auth-secret-file", str(secret),
            "--node-config", self.node_config,
        ]
        if self.max_retries is not None:
            argv += ["--max-retries", str(self.max_retries)]
        env = self._env()
        logs = self.state_dir / "logs"
        self.supernode = ManagedProcess(f"supernode {s.site}", argv, logs / "supernode.log", env=env, cwd=self.state_dir).start()
        self.executor = ManagedProcess(
            f"executor {s.site}",
            [sys.executable, "-m", "client.approval", "superexec", "--approved-builds", str(s.approved_builds),
             *(["--warm"] if i.warm else []),
             "--runtime-api-address", runtime, "--insecure", "--superexec-auth-secret-file", str(secret),
             "--parent-pid", str(self.supernode.pid)],
            logs / "executor.log", env=env, cwd=self.state_dir,
        ).start()
        return self

    def explain_exit(self) -> str | None:
        """Why the SuperNode stopped, in the site operator's words (None while it runs).

        Only this start's log is read (``ManagedProcess.log_text``): an earlier start's cause
        is not this one's.
        """
        if self.supernode is None or self.supernode.alive():
            return None
        # Flower logs its own exit code ("Exit Code: 305") even where the process status is 1.
        text = self.supernode.log_text()
        codes = re.findall(r"Exit Code: (\d+)", text)
        code = int(codes[-1]) if codes else self.supernode.returncode()
        reason = next((meaning for needle, meaning in EXIT_REASONS if needle in text), None)
        if reason is None and GRACEFUL in text and not self.stopped_by_us:
            reason = self._why_graceful(text)
        return f"SuperNode stopped (Flower exit code {code}): {reason or f'see {self.supernode.log_path}'}"

    def _why_graceful(self, text: str) -> str:
        """A SuperNode that stopped itself "gracefully": revoked, or something the log shows."""
        ids = re.findall(r"SuperNode ID: (\d+)", text)
        refused = None
        if ids:
            try:
                refused = key_refused(self.settings, int(ids[-1]))
            except Exception as exc:  # noqa: BLE001 - the probe only explains; it never hides the stop
                refused = None
                text += f"\n(could not ask the server about the key: {exc})"
        if refused:
            return REVOKED
        if refused is None:
            return f"it stopped on its own and the server cannot be reached to say why; see {self.supernode.log_path}"
        return f"it stopped on its own although the server still accepts this site's key; see {self.supernode.log_path}"

    def wait(self, poll: float = 1.0) -> int:
        """Block until the SuperNode exits (or Ctrl-C); returns the exit code for `fedmsk join`.

        A SuperNode only ever stops on its own for a reason (revoked key, server gone, ...), even
        when Flower exits 0 ("terminated gracefully"): that is a failure of the join (1 or
        Flower's code). Ctrl-C or SIGTERM of `fedmsk join` returns 0.
        """
        assert self.supernode is not None
        try:
            while self.supernode.alive():
                time.sleep(poll)
        except KeyboardInterrupt:
            self.stopped_by_us = True
            return 0
        finally:
            self.stop()
        return int(self.supernode.returncode() or 1)

    def stop(self) -> None:
        if self.supernode is not None and self.supernode.alive():
            self.stopped_by_us = True
        for proc in (self.executor, self.supernode):
            if proc is not None:
                proc.stop()
        self._release_lock()

    def __enter__(self) -> "SiteNode":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
