"""`simulation.ray_address`: `fedmsk simulate` on a Ray cluster that is already running.

The cluster is a `ray start --head` on 127.0.0.1 with its own temp dir; the test stops it by the
process ids under that dir (never `ray stop`, which would end every Ray on the machine).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from shared.config import ConfigError, compose
from simulation.runner import check_ray_address, simulate
from simulation.synth import write_federation

TINY = [
    "num_sites=2", "synth.patients_per_site=[40,40]", "synth.image_size=32", "task.image_size=[32,32]", "rounds=1",
    "federation.local_epochs=1", "model.width=8", "model.embed_dim=16", "model.proj_dim=8",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_pids(temp_dir: str) -> list[int]:
    """Processes of this cluster only: every Ray process started by it names its session dir."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if temp_dir.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _stop_cluster(temp_dir: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _cluster_pids(temp_dir):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + 10
        while _cluster_pids(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.2)


def test_unreachable_cluster_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"simulation\.ray_address.*no Ray cluster answers"):
        check_ray_address(f"127.0.0.1:{_free_port()}")
    with pytest.raises(ConfigError, match=r"simulation\.ray_address.*host:port"):
        check_ray_address("localhost")


@pytest.mark.deploy
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="stops its cluster by the process ids under /proc")
def test_simulation_runs_on_a_running_cluster(tmp_path):
    import ray

    port = _free_port()
    address = f"127.0.0.1:{port}"
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    ray_bin = str(Path(sys.executable).with_name("ray"))
    root = tmp_path / "sites"
    write_federation(compose(TINY + [f"data_root={root}"]))
    if ray.is_initialized():  # a Ray left by an earlier simulation in this process would be reused silently
        ray.shutdown()
    try:
        subprocess.run(
            [ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
            check=True, capture_output=True, timeout=120, env=os.environ | {"RAY_USAGE_STATS_ENABLED": "0"},
        )
        drivers = lambda: list(Path(temp_dir).glob("session_*/logs/python-core-driver-*"))  # noqa: E731
        assert not drivers()
        run_dir = tmp_path / "run"
        cfg = compose(TINY + [f"data_root={root}", f"run_dir={run_dir}", f"simulation.ray_address={address}"])
        summary = simulate(cfg)
        # the run's driver joined that cluster: its log is in the cluster's session (a local Ray has its own)
        assert drivers()
        trained = {json.loads(line)["site"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                   if json.loads(line)["phase"] == "train"}
        assert {"site_a", "site_b"} <= trained
        assert summary["test_global"]["auc"] is not None
    finally:
        if ray.is_initialized():
            ray.shutdown()
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
