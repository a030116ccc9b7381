"""Helpers for the deployment tests: free ports, a throwaway Flower app, a copy of the fedmsk app,
and a federation of real processes (SuperLink + gateway + SuperNodes) on 127.0.0.1 that always
stops everything it started.

``shared_consortium`` is the one consortium that tests/test_deploy_failures.py and
tests/test_deploy_federation.py share (tests/conftest.py makes it session-scoped): starting a
server and three warm sites is most of what a deployment test costs, so it is done once. A test
that changes the consortium either leaves it as it found it (the lost-SuperLink test restarts the
server and waits for the sites to come back; the killed site rejoins) or works on sites of its
own (a revoked site is added for that test)."""

from __future__ import annotations

import re
import shutil
import socket
import textwrap
import time
from pathlib import Path

import pytest

from client.approval import ApprovedBuilds
from client.join import Intervals, SiteNode, load_join
from server.gateway import find_nginx
from server.provision import Consortium
from server.superlink import CONNECTION, CoordinatorServer, flwr_cli, node_states

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_nginx() -> None:
    if find_nginx() is None:
        pytest.skip("nginx is not installed (apt-get install -y nginx): the site-facing gateway needs it")


def write_toy_app(folder: Path, variant: str = "") -> Path:
    """A tiny Message-API app: each site adds 1 to the weights after sleeping `sleep` seconds.

    ``variant`` is written into a comment, so two folders differing only in it give builds
    that differ by a byte or so.
    """
    pkg = folder / "toy"
    pkg.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = ["hatchling"]
        build-backend = "hatchling.build"

        [project]
        name = "toy"
        version = "1.0.0"
        description = "throwaway app for fedmsk's deployment tests"
        license = "Apache-2.0"
        dependencies = []

        [tool.hatch.build.targets.wheel]
        packages = ["."]

        [tool.flwr.app]
        publisher = "fedmsk-test"

        [tool.flwr.app.components]
        serverapp = "toy.server:app"
        clientapp = "toy.client:app"

        [tool.flwr.app.config]
        overrides = ""
        """))
    (pkg / "__init__.py").write_text(f"# {variant}\n")
    (pkg / "client.py").write_text(textwrap.dedent("""\
        import time
        from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
        from flwr.clientapp import ClientApp

        app = ClientApp()

        @app.train()
        def train(msg: Message, context: Context) -> Message:
            time.sleep(float(msg.content["config"]["sleep"]))
            arrays = [a + 1.0 for a in msg.content["arrays"].to_numpy_ndarrays()]
            reply = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": 10})})
            return Message(reply, reply_to=msg)
        """))
    (pkg / "server.py").write_text(textwrap.dedent("""\
        import json
        import shlex
        import numpy as np
        from flwr.app import ArrayRecord, ConfigRecord, Context
        from flwr.serverapp import Grid, ServerApp
        from flwr.serverapp.strategy import FedAvg

        app = ServerApp()

        @app.main()
        def main(grid: Grid, context: Context) -> None:
            # `fedmsk launch` sends "k=v ..." in `overrides`, as for the fedmsk app
            rc = {"rounds": "1", "min-nodes": "2", "sleep": "0", "out": ""}
            rc.update(kv.split("=", 1) for kv in shlex.split(str(context.run_config["overrides"])))
            n = int(rc["min-nodes"])
            strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
            result = strategy.start(grid=grid, initial_arrays=ArrayRecord([np.zeros(3)]), num_rounds=int(rc["rounds"]),
                                    timeout=180, train_config=ConfigRecord({"sleep": float(rc["sleep"])}))
            if rc["out"]:
                with open(rc["out"], "w") as fh:
                    json.dump([a.tolist() for a in result.arrays.to_numpy_ndarrays()], fh)
        """))
    return folder


def copy_fedmsk_app(dest: Path) -> Path:
    """The fedmsk Flower app as `flwr run` ships it, copied so that no test run can edit the
    repository's pyproject (Flower rewrites a [tool.flwr.federations] table) and the build is
    quick (no .venv to walk)."""
    for name in ("cli", "client", "server", "shared", "simulation", "configs"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    text = (REPO / "pyproject.toml").read_text()
    text = re.sub(r"\n\[tool\.flwr\.federations[^\n]*\](?:\n(?!\[)[^\n]*)*", "\n", text)
    (dest / "pyproject.toml").write_text(text)
    (dest / "README.md").write_text("fedmsk (test copy)\n")
    return dest


class LocalFederation:
    """A consortium folder, its server, and site nodes, all on 127.0.0.1 with free ports."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.public_port = free_port()
        self.local_port = free_port()
        self.consortium = Consortium(root / "consortium")
        self.consortium.init(f"127.0.0.1:{self.public_port}")
        self.server: CoordinatorServer | None = None
        self.nodes: dict[str, SiteNode] = {}

    def add_site(self, name: str, data_dir: Path | None = None, approve: list[Path] = ()) -> Path:
        bundle = self.consortium.add_site(name)
        if data_dir is not None:
            site_yaml = bundle / "site.yaml"
            text = re.sub(r"(?m)^data_dir:.*$", f"data_dir: {data_dir}", site_yaml.read_text())
            site_yaml.write_text(re.sub(r"(?m)^device:.*$", "device: cpu", text))
        store = ApprovedBuilds(load_join(bundle).approved_builds)
        for app in approve:
            store.approve(app)
        return bundle

    def start_server(self) -> CoordinatorServer:
        self.server = CoordinatorServer(self.consortium, local_port=self.local_port, bind_host="127.0.0.1").start()
        return self.server

    def join(self, name: str, bundle: Path | None = None, intervals: Intervals | None = None, max_retries: int | None = 0,
             state_dir: Path | None = None, **settings_changes) -> SiteNode:
        """Start a site. ``max_retries=0``: a refused site stops at once; ``None``: retries forever (survives a
        SuperLink restart, as `fedmsk join` does)."""
        from dataclasses import replace

        settings = load_join(bundle or self.consortium.bundle_dir(name))
        if settings_changes:
            settings = replace(settings, **settings_changes)
        node = SiteNode(settings, runtime_port=free_port(), max_retries=max_retries, intervals=intervals, state_dir=state_dir)
        node.start()
        self.nodes[f"{name}-{len(self.nodes)}"] = node
        return node

    def wait_online(self, n: int, timeout: float = 60.0) -> None:
        assert self.server is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(s == "online" for s in node_states(self.server.home).values()) >= n:
                return
            time.sleep(1.0)
        raise AssertionError(f"fewer than {n} sites online after {timeout:.0f} s: {node_states(self.server.home)}")

    def log_marks(self) -> dict[str, int]:
        """Where each shared site's SuperNode log ends now (for ``wait_reconnected``)."""
        return {name: node.supernode.log_path.stat().st_size for name, node in self.site_nodes.items()}

    def wait_reconnected(self, marks: dict[str, int], timeout: float = 120.0) -> None:
        """Wait until every shared site logged a successful reconnection after ``marks``, then is online.

        After a SuperLink restart its state.db still says "online" for up to two heartbeats, so
        node_states alone passes before a site has actually reconnected; Flower's retry invoker
        logs "Connection successful after ..." when a failed call finally goes through.
        """
        deadline = time.monotonic() + timeout
        waiting = dict(marks)
        while waiting and time.monotonic() < deadline:
            for name, mark in list(waiting.items()):
                with open(self.site_nodes[name].supernode.log_path, "rb") as fh:
                    fh.seek(mark)
                    if b"Connection successful after" in fh.read():
                        del waiting[name]
            time.sleep(0.5)
        assert not waiting, f"sites not reconnected after {timeout:.0f} s: {sorted(waiting)}"
        self.wait_online(len(marks), timeout=max(1.0, deadline - time.monotonic()))

    def run_log(self, run_id: str) -> str:
        import subprocess
        import sys

        from server.superlink import flwr_env

        out = subprocess.run([str(Path(sys.executable).with_name("flwr")), "log", run_id, CONNECTION, "--show"],
                             capture_output=True, text=True, env=flwr_env(self.server.home), timeout=60,
                             cwd=self.server.home)
        return out.stdout + out.stderr

    def flwr(self, *args: str) -> dict:
        return flwr_cli(self.server.home, *args)

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()
        if self.server is not None:
            self.server.stop()


SITES = ["site_a", "site_b", "site_c"]
# Tiny MM-CL runs: 3 sites (60/50/50 patients, 32x32 images), evaluation rounds off.
TINY = [
    "num_sites=3",
    "synth.patients_per_site=[60,50,50]",
    "synth.image_size=48",
    "task.image_size=[32,32]",
    "federation.local_epochs=1",
    "model.width=8",
    "model.embed_dim=32",
    "model.proj_dim=16",
    "model.aux_loss=prototype",  # per-sample: the sites' own privacy policy (DP on) refuses batch-coupled losses
    "strategy.min_train_nodes=2",
    "strategy.min_evaluate_nodes=2",
    "strategy.min_available_nodes=2",
    "strategy.round_timeout_s=300",
    "strategy.fraction_evaluate=0.0",
]
COLD = Intervals(warm=False)  # for sites that are refused before any message: no fork server to import torch into


def shared_consortium(root: Path):
    """The shared consortium (a generator for a fixture): server, gateway and three online sites.

    site_a and site_b approve the fedmsk app and the throwaway app ``toy``; site_c approves the
    fedmsk app and a build of the throwaway app that differs by a byte (``toy_changed``), so it
    refuses ``toy``. ``site_revoked`` has a bundle and is never started here.
    """
    from shared.config import compose
    from simulation.synth import write_federation

    require_nginx()
    data = root / "sites"
    write_federation(compose(TINY + [f"data_root={data}"]))
    f = LocalFederation(root)
    f.data = data
    f.fedmsk_app = copy_fedmsk_app(root / "fedmsk_app")
    f.toy = write_toy_app(root / "toy")
    f.toy_changed = write_toy_app(root / "toy_changed", variant="one byte")
    try:
        for name in SITES:
            f.add_site(name, data / name, approve=[f.fedmsk_app, f.toy_changed if name == "site_c" else f.toy])
        f.add_site("site_revoked", data / "site_a")
        f.start_server()
        f.site_nodes = {name: f.join(name, max_retries=None) for name in SITES}
        f.wait_online(3, timeout=120)
        yield f
    finally:
        f.stop()
