"""Deployment timings on one machine: a loopback consortium of real processes, as in the README.

Brings up `fedmsk server` (SuperLink + executor + nginx gateway, TLS and site keys) and three
`fedmsk join` sites (SuperNode + approving executor), all on 127.0.0.1 with free ports, then
follows one `fedmsk launch` run (tiny synthetic data, MM-CL by default, 2 rounds, each site
under its bundle's own DP policy). Measures, side by side in the same run:

- server ready: `CoordinatorServer.start()` until the gateway accepts connections;
- site online: `SiteNode.start()` until the SuperLink lists the node as online (each site);
- per-round wall time at the coordinator (from the run folder's metrics timestamps);
- the sites' local training time for the same round, measured by calling the same
  ``client.app.run_train`` in this process (cold: first call, with data loading; warm: training
  only), so ``round wall / local training`` is the deployment overhead ratio.

Prints a table and writes bench/results/bench_deploy.json.

    python bench/bench_deploy.py [--rounds 2] [--eval] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"

from client.approval import ApprovedBuilds  # noqa: E402
from client.join import SiteNode, load_join  # noqa: E402
from server.launch import launch  # noqa: E402
from server.provision import Consortium  # noqa: E402
from server.superlink import CoordinatorServer, node_states  # noqa: E402
from shared.config import compose  # noqa: E402
from simulation.synth import write_federation  # noqa: E402
from tests.deploy_helpers import copy_fedmsk_app, free_port  # noqa: E402

SITES = ["site_a", "site_b", "site_c"]
TINY = [
    "num_sites=3", "synth.patients_per_site=[60,50,50]", "synth.image_size=48", "task.image_size=[32,32]",
    "federation.local_epochs=1", "model.width=8", "model.embed_dim=32", "model.proj_dim=16",
    "model.aux_loss=prototype", "strategy.min_train_nodes=3", "strategy.min_evaluate_nodes=3",
    "strategy.min_available_nodes=3", "strategy.round_timeout_s=600",
]


def wait_online(server: CoordinatorServer, node_ids: dict[str, int], started: dict[str, float], timeout: float = 300) -> dict[str, float]:
    """Seconds from each site's start until the SuperLink lists its node as online."""
    online: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(online) < len(node_ids) and time.monotonic() < deadline:
        states = node_states(server.home)
        for name, node in node_ids.items():
            if name not in online and states.get(node) == "online":
                online[name] = time.monotonic() - started[name]
        time.sleep(0.5)
    if len(online) < len(node_ids):
        raise RuntimeError(f"sites not online after {timeout:.0f} s: {sorted(set(node_ids) - set(online))}")
    return online


def round_walls(run_dir: Path) -> list[float]:
    """Wall seconds of each train round, from the coordinator's metrics timestamps.

    A round ends when its aggregated row ("global") is written; round 1 starts when the
    ServerApp wrote the run's config.yaml (RunRecorder), so round 1 includes the ServerApp's
    own start-up after the run was taken.
    """
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ends = sorted(r["time"] for r in rows if r["phase"] == "train" and r["site"] == "global")
    start = (run_dir / "config.yaml").stat().st_mtime
    return [b - a for a, b in zip([start, *ends[:-1]], ends)]


def local_training(cfg_overrides: list[str], data: Path, policy: Path) -> dict[str, dict[str, float]]:
    """Per site: seconds of ``run_train`` in this process, cold (with data loading) and warm."""
    from client.app import run_train
    from client.trainer import build_screener
    from shared.config import to_yaml

    cfg = compose(cfg_overrides + [f"data_root={data}", "rounds=2"])
    job = to_yaml(cfg)
    weights = build_screener(cfg).state_dict()
    out = {}
    for name in SITES:
        node = {"site-name": name, "data-dir": str(data / name), "privacy-config": str(policy)}
        times = []
        for rnd in (1, 2):
            t0 = time.perf_counter()
            run_train(node, job, weights, rnd, run_id=f"bench-{name}")
            times.append(time.perf_counter() - t0)
        out[name] = {"cold_s": times[0], "warm_s": times[1]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--eval", action="store_true", help="also evaluate on the sites each round (more messages)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    console = Console()
    run_overrides = TINY + [f"rounds={args.rounds}"] + ([] if args.eval else ["strategy.fraction_evaluate=0.0"]) + args.overrides

    with tempfile.TemporaryDirectory(prefix="bench_deploy_") as tmp:
        root = Path(tmp)
        data = root / "sites"
        write_federation(compose(run_overrides + [f"data_root={data}"]))
        # the local-training measurement gets its own copy: the run spends the sites' DP budget (ledgers live in the data)
        local_data = shutil.copytree(data, root / "sites_local")
        app = copy_fedmsk_app(root / "app")
        public_port, local_port = free_port(), free_port()
        consortium = Consortium(root / "consortium")
        t0 = time.perf_counter()
        consortium.init(f"127.0.0.1:{public_port}")
        for name in SITES:
            bundle = consortium.add_site(name)
            text = re.sub(r"(?m)^data_dir:.*$", f"data_dir: {data / name}", (bundle / "site.yaml").read_text())
            (bundle / "site.yaml").write_text(re.sub(r"(?m)^device:.*$", "device: cpu", text))
            ApprovedBuilds(load_join(bundle).approved_builds).approve(app)
        provision_s = time.perf_counter() - t0

        server = CoordinatorServer(consortium, local_port=local_port, bind_host="127.0.0.1")
        nodes: list[SiteNode] = []
        try:
            t0 = time.perf_counter()
            server.start()
            server_ready_s = time.perf_counter() - t0
            started = {}
            for name in SITES:
                started[name] = time.monotonic()
                nodes.append(SiteNode(load_join(consortium.bundle_dir(name)), runtime_port=free_port(), max_retries=0).start())
            site_online_s = wait_online(server, {n: consortium.site(n).node_id for n in SITES}, started)

            run_dir = root / "run"
            t0 = time.perf_counter()
            result = launch(consortium, run_overrides + [f"run_dir={run_dir}"], app_dir=app, stream=False)
            launch_s = time.perf_counter() - t0
            if not result.ok:
                raise RuntimeError(f"the benchmark run ended {result.status}: {result.reason}")
            walls = round_walls(run_dir)
        finally:
            for node in nodes:
                node.stop()
            server.stop()
        policy = consortium.bundle_dir(SITES[0]) / "privacy.yaml"
        console.print(f"server ready {server_ready_s:.1f} s, sites online {site_online_s}, rounds {walls}")
        local = local_training(run_overrides, local_data, policy)

    warm = max(v["warm_s"] for v in local.values())
    cold = max(v["cold_s"] for v in local.values())
    report = {
        # other work on the machine inflates every figure: the load average says how busy it was
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_start": load_start, "load_avg_end": os.getloadavg()},
        "config": run_overrides,
        "provision_s": provision_s,
        "server_ready_s": server_ready_s,
        "site_online_s": site_online_s,
        "launch_total_s": launch_s,
        "round_wall_s": walls,
        "local_training_s": local,
        "overhead_ratio_warm": [w / warm for w in walls],
        "overhead_ratio_cold": [w / cold for w in walls],
    }
    table = Table("step", "seconds")
    table.add_row("certs init + 3 x add-site + approve", f"{provision_s:.1f}")
    table.add_row("fedmsk server until sites can connect", f"{server_ready_s:.1f}")
    for name, s in site_online_s.items():
        table.add_row(f"{name} joining until online", f"{s:.1f}")
    table.add_row("fedmsk launch, submit to finished", f"{launch_s:.1f}")
    for i, w in enumerate(walls, 1):
        table.add_row(f"round {i} wall time (coordinator)", f"{w:.1f}")
    table.add_row("a site's local training, cold (data load + train), slowest site", f"{cold:.1f}")
    table.add_row("a site's local training, warm (train only), slowest site", f"{warm:.1f}")
    console.print(table)
    console.print("round wall / local training (warm): " + ", ".join(f"{r:.1f}x" for r in report["overhead_ratio_warm"]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_deploy.json").write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {RESULTS / 'bench_deploy.json'}")


if __name__ == "__main__":
    main()
