"""App approval at the hospital: run only the app builds (FABs) the site operator approved.

Flower's ``--trusted-entities`` accepts only apps signed through Flower's hub, so a consortium
that ships its own builds with ``flwr run .`` needs its own gate. Flower builds are
deterministic (the same source gives the same SHA-256, which ``flwr ls`` shows as ``fab-hash``),
so the gate is an allow-list of SHA-256 digests kept by the site (``approved-builds.json``).

Where the check sits: the SuperNode runs in ``--isolation process`` mode, so the site starts the
executor (``flower-superexec``) itself. We start Flower's own SuperExec with one change: for a
ClientApp task it launches ``python -m client.approval clientapp ...`` instead of
``flwr-clientapp``. That process is Flower's own ClientApp runner with one hook: the FAB bytes it
receives are hashed and compared with the allow-list *before* Flower installs the FAB, so no
code of an unapproved app is ever written to disk or imported. A refusal raises inside Flower's
runner, which turns it into an error reply: the server logs the reason and the round goes on
with the other sites.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from shared.config import ConfigError

log = logging.getLogger("fedmsk.approval")


class UnapprovedBuildError(RuntimeError):
    """An app build whose SHA-256 the site operator has not approved."""


@dataclass
class Approval:
    sha256: str
    source: str
    approved_at: str
    fab_id: str = ""


def fab_sha256(path: str | Path) -> tuple[str, str]:
    """SHA-256 of an app build, and the app's id ("publisher/name") when known.

    ``path`` is a ``.fab`` file (as ``flwr build`` writes it) or an app source folder, which is
    built in memory with Flower's own builder so the digest equals the one ``flwr run`` sends.
    """
    p = Path(path).expanduser().resolve()
    if p.is_file():
        content = p.read_bytes()
        if not zipfile.is_zipfile(p):
            raise ConfigError(f"{p} is not a Flower app build (.fab, a zip archive); pass the .fab or the app's source folder")
        return hashlib.sha256(content).hexdigest(), ""
    if p.is_dir():
        if not (p / "pyproject.toml").is_file():
            raise ConfigError(f"{p} has no pyproject.toml; pass a Flower app folder (with [tool.flwr.app]) or a .fab file")
        from flwr.cli.build import build_fab_from_disk
        from flwr.cli.config_utils import load

        content = build_fab_from_disk(p)
        cfg = load(p / "pyproject.toml") or {}
        fab_id = f"{cfg.get('tool', {}).get('flwr', {}).get('app', {}).get('publisher', '')}/{cfg.get('project', {}).get('name', '')}"
        return hashlib.sha256(content).hexdigest(), fab_id
    raise ConfigError(f"{p} does not exist; pass an app build (.fab) or the app's source folder")


class ApprovedBuilds:
    """The site's allow-list, a JSON file the operator edits only through `fedmsk approve`.

    It is read again for every task, so approving a new build needs no restart.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser().resolve()

    def load(self) -> dict[str, Approval]:
        if not self.path.is_file():
            return {}
        try:
            raw = json.loads(self.path.read_text())
            return {digest: Approval(**entry) for digest, entry in raw.get("approved", {}).items()}
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"approved builds file {self.path} is damaged ({exc}); restore it or re-approve builds") from None

    def approve(self, path: str | Path) -> Approval:
        digest, fab_id = fab_sha256(path)
        entries = self.load()
        entry = Approval(sha256=digest, source=str(Path(path).resolve()), approved_at=dt.datetime.now(dt.timezone.utc).isoformat(), fab_id=fab_id)
        entries[digest] = entry
        self._save(entries)
        return entry

    def revoke(self, digest: str) -> bool:
        entries = self.load()
        found = entries.pop(digest, None) is not None
        self._save(entries)
        return found

    def _save(self, entries: dict[str, Approval]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"approved": {d: asdict(a) for d, a in entries.items()}}, indent=2) + "\n")
        tmp.replace(self.path)

    def check(self, fab_content: bytes) -> str:
        """Return the build's digest if approved; raise UnapprovedBuildError (and log) otherwise."""
        digest = hashlib.sha256(fab_content).hexdigest()
        if digest not in self.load():
            message = (
                f"refusing app build sha256={digest}: not approved at this site ({self.path}). "
                f"If the site operator trusts it: `fedmsk approve <the .fab or its source folder>`."
            )
            log.error(message)
            raise UnapprovedBuildError(message)
        log.info("app build sha256=%s is approved at this site", digest)
        return digest


# --- the two processes the site runs instead of Flower's stock ones --------------------------


def clientapp_command(approved: Path) -> list[str]:
    """argv prefix that replaces `flwr-clientapp` for ClientApp tasks."""
    return [sys.executable, "-m", "client.approval", "clientapp", "--approved-builds", str(approved)]


def _approving_executor(approved: Path, launcher=None):
    """Flower's SubprocessExecutor, launching the checking ClientApp runner for ClientApp tasks.

    ``launcher`` (client.warm.WarmLauncher) forks each ClientApp from a process that already
    imported it, instead of starting a new interpreter.
    """
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import LaunchResult
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

    class ApprovingExecutor(SubprocessExecutor):
        children: list[subprocess.Popen] = []

        def reconcile(self) -> None:
            """Reap finished ClientApp processes (called by the SuperExec loop) so none linger as zombies."""
            self.children = [p for p in self.children if p.poll() is None]

        def launch(self, spec):  # type: ignore[no-untyped-def]
            if spec.task_type != TaskType.CLIENT_APP:
                return super().launch(spec)
            # Same arguments Flower's SubprocessExecutor passes to `flwr-clientapp`.
            args = ["--runtime-api-address", spec.runtime_api_address, "--token", spec.token]
            if spec.insecure:
                args.append("--insecure")
            elif spec.root_certificates_path is not None:
                args += ["--root-certificates", spec.root_certificates_path]
            if spec.parent_pid is not None:
                args += ["--parent-pid", str(spec.parent_pid)]
            if spec.runtime_dependency_install:
                args.append("--allow-runtime-dependency-installation")
            if launcher is not None:
                self.children.append(launcher.launch(args))
            else:
                self.children.append(subprocess.Popen([*clientapp_command(approved), *args]))  # noqa: S603 - our own interpreter and module
            return LaunchResult.accepted()

    return ApprovingExecutor()


def run_superexec(approved: Path, flower_args: list[str], warm: bool = False) -> None:
    """Run Flower's `flower-superexec` with the approving executor (``warm``: client.warm)."""
    import flwr.supercore.superexec.run_superexec as superexec_module
    from flwr.supercore.cli.flower_superexec import flower_superexec

    launcher = None
    if warm:
        from client.warm import WarmLauncher

        launcher = WarmLauncher(approved).start()
    superexec_module.get_executor = lambda *a, **k: _approving_executor(approved, launcher)
    sys.argv = ["flower-superexec", *flower_args]
    flower_superexec()


def run_clientapp(approved: Path, flower_args: list[str], after_check=None) -> None:
    """Run Flower's `flwr-clientapp` with the FAB check in front of the FAB installation.

    ``after_check(fab_content)`` runs once the build is approved, before Flower installs and
    imports it (client.warm.drop_stale_modules: the approved build's own code is what runs).
    """
    import flwr.supernode.runtime.run_clientapp as runner
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    store = ApprovedBuilds(approved)
    install = runner.install_from_fab

    def install_if_approved(fab_content: bytes, *args, **kwargs):  # type: ignore[no-untyped-def]
        store.check(fab_content)
        if after_check is not None:
            after_check(fab_content)
        return install(fab_content, *args, **kwargs)

    runner.install_from_fab = install_if_approved
    sys.argv = ["flwr-clientapp", *flower_args]
    flwr_clientapp()


def setup_logging() -> None:
    """This module's log lines on stderr (the site's executor log), once per process."""
    if log.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s fedmsk.approval: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # Flower's own loggers keep their format; only ours is added


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m client.approval", description=__doc__.splitlines()[0])
    parser.add_argument("process", choices=("superexec", "clientapp"))
    parser.add_argument("--approved-builds", required=True, type=Path)
    parser.add_argument("--warm", action="store_true", help="superexec: fork each ClientApp from a warm process (client.warm)")
    args, flower_args = parser.parse_known_args(argv)
    setup_logging()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if args.process == "superexec":
        run_superexec(args.approved_builds, flower_args, warm=args.warm)
    else:
        from client.warm import drop_stale_modules

        run_clientapp(args.approved_builds, flower_args, after_check=drop_stale_modules)


if __name__ == "__main__":
    main()
