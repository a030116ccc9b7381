"""Deployment timings on one machine: a loopback consortium of real processes, as in the README.

Round overhead (default): brings up `fedmsk server` (SuperLink + executor + nginx gateway, TLS
and site keys) and three `fedmsk join` sites (SuperNode + approving executor), all on 127.0.0.1
with free ports, then follows one `fedmsk launch` run (tiny synthetic data, MM-CL, each site
under its bundle's own DP policy). Measured side by side in the same run:

- server ready: `CoordinatorServer.start()` until the gateway accepts connections;
- site online: `SiteNode.start()` until the SuperLink lists the node as online (each site);
- per-round wall time at the coordinator (from the run folder's metrics timestamps);
- the sites' local work for the same rounds, measured by calling the same
  ``client.app.run_train`` (and ``run_evaluate`` with ``--eval``) in this process, after the
  run (cold: first call, with data loading; warm: the work only), so ``round wall / local
  work`` is the deployment overhead, and the issue's goal is ``round <= 1.5 x work + 10 s``.

``--stock`` runs the same with Flower 1.41's own behaviour at the sites and the ServerApp (a
fresh ClientApp interpreter per message, 3 s SuperNode poll, 30 s heartbeat, 1 s executor poll,
3 s ServerApp reply poll), for the figures beside it.

SuperLink sizing (``--sites N``, e.g. 20): N sites running the throwaway app of the deployment
tests (no training: the SuperLink's own cost), cold ClientApps. Measures the SuperLink's memory
(idle, with N sites online, peak during rounds), its state database on disk, TCP connections at
the gateway and the SuperLink, requests per second at the gateway with every site idle, the
time until all N are online and the wall time of a one-round run of N messages.

Prints a table and writes bench/results/bench_deploy.json (bench_deploy_sites<N>.json for
``--sites``).

    python bench/bench_deploy.py [--rounds 3] [--eval] [--stock] [overrides ...]
    python bench/bench_deploy.py --sites 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
RESULTS = REPO / "bench" / "results"

from client.join import Intervals  # noqa: E402
from deploy_helpers import LocalFederation, copy_fedmsk_app, write_toy_app  # noqa: E402
from server.launch import launch  # noqa: E402
from server.superlink import node_states  # noqa: E402
from shared.config import compose  # noqa: E402

SITES = ["site_a", "site_b", "site_c"]
TINY = [
    "num_sites=3", "synth.patients_per_site=[60,50,50]", "synth.image_size=48", "task.image_size=[32,32]",
    "federation.local_epochs=1", "model.width=8", "model.embed_dim=32", "model.proj_dim=16",
    "model.aux_loss=prototype", "strategy.min_train_nodes=3", "strategy.min_evaluate_nodes=3",
    "strategy.min_available_nodes=3", "strategy.round_timeout_s=600",
]
FLOWER_REPLY_POLL_S = 3.0  # HttpGrid.send_and_receive's own sleep


def machine(load_start: tuple[float, float, float]) -> dict:
    # other work on the machine inflates every figure: the load average says how busy it was
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "load_avg_start": load_start,
            "load_avg_end": os.getloadavg()}


def wait_all_online(fed: LocalFederation, names: list[str], started: dict[str, float], timeout: float = 600) -> dict[str, float]:
    """Seconds from each site's start until the SuperLink lists its node as online."""
    ids = {n: fed.consortium.site(n).node_id for n in names}
    online: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(online) < len(ids) and time.monotonic() < deadline:
        states = node_states(fed.server.home)
        for name, node in ids.items():
            if name not in online and states.get(node) == "online":
                online[name] = time.monotonic() - started[name]
        time.sleep(0.5)
    if len(online) < len(ids):
        raise RuntimeError(f"sites not online after {timeout:.0f} s: {sorted(set(ids) - set(online))}")
    return online


def round_walls(run_dir: Path) -> list[float]:
    """Wall seconds of each round, from the coordinator's metrics timestamps.

    A round ends when its last aggregated row ("global": train, then validation when sites
    evaluate) is written; round 1 starts when the ServerApp wrote the run's config.yaml
    (RunRecorder), so round 1 also holds the ServerApp's start-up and the round-0 validation.
    """
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ends: dict[int, float] = {}
    for r in rows:
        if r["site"] == "global" and r.get("split", "val") != "test" and r["round"] >= 1:
            ends[r["round"]] = max(ends.get(r["round"], 0.0), r["time"])
    start = (run_dir / "config.yaml").stat().st_mtime
    marks = [start, *(ends[k] for k in sorted(ends))]
    return [b - a for a, b in zip(marks, marks[1:])]


def local_work(cfg_overrides: list[str], data: Path, policy: Path, evaluate: bool) -> dict[str, dict[str, float]]:
    """Per site: seconds of ``run_train`` (+ ``run_evaluate``) in this process, cold and warm."""
    from client.app import run_evaluate, run_train
    from client.trainer import build_screener
    from shared.config import to_yaml

    cfg = compose(cfg_overrides + [f"data_root={data}"])
    job = to_yaml(cfg)
    weights = build_screener(cfg).state_dict()
    out = {}
    for name in SITES:
        node = {"site-name": name, "data-dir": str(data / name), "privacy-config": str(policy)}
        times = []
        for rnd in (1, 2):
            t0 = time.perf_counter()
            run_train(node, job, weights, rnd, run_id=f"bench-{name}")
            if evaluate:
                run_evaluate(node, job, weights, "val", rnd)
            times.append(time.perf_counter() - t0)
        out[name] = {"cold_s": times[0], "warm_s": times[1]}
    return out


def overhead(args: argparse.Namespace, console: Console) -> dict:
    rounds_cfg = TINY + [f"rounds={args.rounds}"] + ([] if args.eval else ["strategy.fraction_evaluate=0.0"])
    if args.stock:
        rounds_cfg.append(f"federation.reply_poll_s={FLOWER_REPLY_POLL_S}")
    run_overrides = rounds_cfg + args.overrides
    intervals = Intervals.flower() if args.stock else Intervals()
    with tempfile.TemporaryDirectory(prefix="bench_deploy_") as tmp:
        root = Path(tmp)
        data = root / "sites"
        from simulation.synth import write_federation

        write_federation(compose(run_overrides + [f"data_root={data}"]))
        # the local measurement gets its own copy: the run spends the sites' DP budget (ledgers live in the data)
        local_data = shutil.copytree(data, root / "sites_local")
        t0 = time.perf_counter()
        fed = LocalFederation(root)
        app = copy_fedmsk_app(root / "app")
        for name in SITES:
            fed.add_site(name, data / name, approve=[app])
        provision_s = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            fed.start_server()
            server_ready_s = time.perf_counter() - t0
            started = {}
            for name in SITES:
                started[name] = time.monotonic()
                fed.join(name, intervals=intervals)
            site_online_s = wait_all_online(fed, SITES, started)
            run_dir = root / "run"
            t0 = time.perf_counter()
            result = launch(fed.consortium, run_overrides + [f"run_dir={run_dir}"], app_dir=app, stream=False)
            launch_s = time.perf_counter() - t0
            if not result.ok:
                raise RuntimeError(f"the benchmark run ended {result.status}: {result.reason}")
            walls = round_walls(run_dir)
        finally:
            fed.stop()
        console.print(f"server ready {server_ready_s:.1f} s, sites online {site_online_s}, rounds {walls}")
        local = local_work(run_overrides, local_data, fed.consortium.bundle_dir(SITES[0]) / "privacy.yaml", args.eval)

    warm = max(v["warm_s"] for v in local.values())
    cold = max(v["cold_s"] for v in local.values())
    steady = walls[1:] or walls  # round 1 also holds the ServerApp's start-up
    goal = 1.5 * warm + 10.0
    report = {
        "mode": "stock Flower 1.41 behaviour" if args.stock else "fedmsk (warm ClientApps, short polls)",
        "intervals": asdict(intervals),
        "config": run_overrides,
        "provision_s": provision_s,
        "server_ready_s": server_ready_s,
        "site_online_s": site_online_s,
        "launch_total_s": launch_s,
        "round_wall_s": walls,
        "local_work_s": local,
        "local_work_warm_slowest_s": warm,
        "goal_s": goal,
        "goal_met_rounds_2_on": all(w <= goal for w in steady),
        "overhead_ratio_warm": [w / warm for w in walls],
        "overhead_s_warm": [w - warm for w in walls],
    }
    table = Table("step", "seconds")
    table.add_row("certs init + 3 x add-site + approve", f"{provision_s:.1f}")
    table.add_row("fedmsk server until sites can connect", f"{server_ready_s:.1f}")
    for name, s in site_online_s.items():
        table.add_row(f"{name} joining until online", f"{s:.1f}")
    table.add_row("fedmsk launch, submit to finished", f"{launch_s:.1f}")
    what = "train + validation" if args.eval else "train"
    for i, w in enumerate(walls, 1):
        table.add_row(f"round {i} wall time (coordinator, {what})" + (" incl. ServerApp start" if i == 1 else ""), f"{w:.1f}")
    table.add_row(f"a site's local {what}, cold (data load + work), slowest site", f"{cold:.1f}")
    table.add_row(f"a site's local {what}, warm (work only), slowest site", f"{warm:.1f}")
    table.add_row("goal: 1.5 x warm + 10 s", f"{goal:.1f}")
    console.print(table)
    console.print(f"{report['mode']}: round wall / local work (warm): " + ", ".join(f"{r:.1f}x" for r in report["overhead_ratio_warm"])
                  + f"; goal met from round 2 on: {report['goal_met_rounds_2_on']}")
    return report


class Sampler:
    """Peak resident memory of a process (and its children) sampled every 0.5 s in a thread."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        try:
            return self.proc.memory_info().rss
        except psutil.Error:
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(0.5)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def connections(port: int) -> int:
    """Established TCP connections whose local end is 127.0.0.1:port (the server side)."""
    return sum(1 for c in psutil.net_connections(kind="tcp")
               if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)


def tree_rss(pid: int) -> int:
    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    except psutil.Error:
        return 0


def sizing(args: argparse.Namespace, console: Console) -> dict:
    n = args.sites
    names = [f"site_{i:02d}" for i in range(n)]
    mb = 2**20
    with tempfile.TemporaryDirectory(prefix="bench_deploy_sites_") as tmp:
        root = Path(tmp)
        data = root / "data"
        data.mkdir()
        (data / "clinical.csv").write_text("patient_id\n")  # the throwaway app reads no data; join checks the folder
        fed = LocalFederation(root)
        toy = write_toy_app(root / "toy")
        for name in names:
            fed.add_site(name, data, approve=[toy])
        intervals = Intervals(warm=False)  # no torch in the throwaway app: each fork server would only cost memory
        try:
            t0 = time.perf_counter()
            fed.start_server()  # registers every site key (one `flwr supernode register` each)
            server_ready_s = time.perf_counter() - t0
            superlink = fed.server.superlink.pid
            idle_rss = Sampler(superlink).rss()
            started = {}
            t0 = time.perf_counter()
            for name in names:
                started[name] = time.monotonic()
                fed.join(name, intervals=intervals)
            online = wait_all_online(fed, names, started)
            all_online_s = time.perf_counter() - t0
            time.sleep(5)
            online_rss = Sampler(superlink).rss()
            access = fed.consortium.root / "gateway" / "access.log"
            before = access.read_text().count("\n") if access.exists() else 0
            time.sleep(10)
            idle_rps = ((access.read_text().count("\n") if access.exists() else 0) - before) / 10.0
            conns = {"gateway": connections(fed.public_port), "superlink": connections(fed.local_port)}
            site_rss = [tree_rss(node.supernode.pid) + tree_rss(node.executor.pid) for node in fed.nodes.values()]
            with Sampler(superlink) as peak:
                t0 = time.perf_counter()
                result = launch(fed.consortium, [f"min-nodes={n}", "rounds=1"], app_dir=toy, stream=False, timeout_s=1800)
                run_s = time.perf_counter() - t0
                if not result.ok:
                    raise RuntimeError(f"the run of {n} sites ended {result.status}")
            db = fed.consortium.root / "state.db"
            db_bytes = sum(p.stat().st_size for p in db.parent.glob("state.db*"))
            server_rss = {"superlink_idle_mb": idle_rss / mb, f"superlink_{n}_online_mb": online_rss / mb,
                          "superlink_peak_in_rounds_mb": peak.peak / mb,
                          "executor_mb": tree_rss(fed.server.executor.pid) / mb, "gateway_mb": tree_rss(fed.server.gateway.pid) / mb}
        finally:
            fed.stop()
    report = {
        "mode": f"SuperLink sizing, {n} sites (throwaway app, cold ClientApps, fedmsk intervals)",
        "intervals": asdict(intervals),
        "sites": n,
        "server_ready_s": server_ready_s,
        "all_online_s": all_online_s,
        "site_online_s_max": max(online.values()),
        "memory": server_rss,
        "site_processes_mb_mean": sum(site_rss) / len(site_rss) / mb,
        "state_db_bytes": db_bytes,
        "connections_established": conns,
        "gateway_requests_per_s_idle": idle_rps,
        "run_1_round_s": run_s,
    }
    table = Table("SuperLink sizing", f"{n} sites")
    table.add_row(f"fedmsk server start, {n} keys registered", f"{server_ready_s:.0f} s")
    table.add_row("all sites online after", f"{all_online_s:.0f} s")
    for key, value in server_rss.items():
        table.add_row(key.replace("_", " "), f"{value:.0f}")
    table.add_row("one site's SuperNode + executor, mean MB", f"{report['site_processes_mb_mean']:.0f}")
    table.add_row("state.db (+ WAL) after one run", f"{db_bytes / 1024:.0f} kB")
    table.add_row("established TCP at gateway / SuperLink", f"{conns['gateway']} / {conns['superlink']}")
    table.add_row("gateway requests/s, all sites idle", f"{idle_rps:.1f}")
    table.add_row(f"a 1-round run of {n} messages, submit to finished", f"{run_s:.1f} s")
    console.print(table)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eval", action="store_true", help="also validate on the sites each round (two exchanges a round)")
    parser.add_argument("--stock", action="store_true", help="Flower 1.41's own intervals and a fresh ClientApp per message")
    parser.add_argument("--sites", type=int, default=0, help="SuperLink sizing with this many sites (throwaway app)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    load_start = os.getloadavg()
    console = Console()
    report = sizing(args, console) if args.sites else overhead(args, console)
    report["machine"] = machine(load_start)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"bench_deploy_sites{args.sites}.json" if args.sites else f"bench_deploy{'_stock' if args.stock else ''}{'_eval' if args.eval else ''}.json"
    (RESULTS / name).write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
