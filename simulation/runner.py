"""`fedmsk simulate`: every site folder of a data root as one simulated hospital, through
Flower's simulation engine, with the same ClientApp and ServerApp as a real deployment.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import warnings
from pathlib import Path

from rich.console import Console

from client.site import list_sites
from server.app import default_run_dir, make_server_app
from shared.config import ConfigError, FedmskConfig


def backend_config(cfg: FedmskConfig) -> dict:
    """Ray resources per simulated site: 1 CPU each lets two sites train at once on 2 cores
    (Flower's default of 2 CPUs a site would run them one at a time).

    ``simulation.ray_address`` goes to ``ray.init(address=...)`` through Flower's ``init_args``
    (flwr's RayBackend.init_ray), so the run joins that cluster instead of starting its own.
    """
    init_args: dict = {"logging_level": "error", "log_to_driver": False, "include_dashboard": False}
    if cfg.simulation.ray_address:
        init_args["address"] = cfg.simulation.ray_address
    return {
        "client_resources": {"num_cpus": cfg.federation.client_cpus, "num_gpus": client_gpus(cfg)},
        "init_args": init_args,
    }


# Ray starts its workers at nice 15 (its C++ default `worker_niceness`), below the driver: on a
# machine with any other load the simulated sites then get a sliver of a core each and two sites
# training at once is slower than one plain loop (measured here: 1.5-1.8x). 0 keeps them at the
# driver's own priority (`nice fedmsk simulate` still lowers the whole tree). Read by the raylet
# fedmsk starts; a cluster joined through simulation.ray_address keeps its own setting.
WORKER_NICENESS_ENV = "RAY_worker_niceness"
WARM_HOOK = "simulation.runner.warm_worker"
# Every Ray task and actor call reports its state changes to the GCS, which keeps up to 100 000 task
# records (RAY_task_events_max_num_task_in_gcs) for `ray list tasks` and the dashboard's timeline:
# with two messages a site a round that is the one memory that grew between round 2 and round 20
# (bench/bench_scale.py --leak: GCS +5.4 MB over 50 sites x 12 rounds, the workers flat). fedmsk
# starts Ray without its dashboard and reads no task events, so a local Ray reports none (0 turns
# the reporting off); a cluster joined through simulation.ray_address keeps its own setting.
TASK_EVENTS_ENV = "RAY_task_events_report_interval_ms"
# Ray waits a hard-coded 30 s for its raylet to register (ray/_private/node.py); on an overloaded
# machine that can pass once and succeed on the next try
RAY_START_ATTEMPTS = 3
log = logging.getLogger("fedmsk.simulate")


def warm_worker() -> None:
    """Ray's ``worker_process_setup_hook``: a worker imports what a ClientApp message needs when it
    starts, while the driver is still setting up, not on its first message (torch, Flower, Opacus,
    MONAI and fedmsk's ClientApp: several seconds of CPU each worker)."""
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    import monai.data  # noqa: F401  (shared.sitedata's datasets)

    import client.secagg_app  # noqa: F401  (client.app, the trainer, the models, Opacus)
    import shared.sitedata  # noqa: F401


def start_ray(cfg: FedmskConfig) -> None:
    """Start (or join) Ray before Flower's backend would, with the settings a simulated site needs.

    Flower's ``RayBackend.init_ray`` does nothing when Ray is already up, and ``run_simulation``
    shuts it down at the end. What this adds to Flower's own start: the workers' setup hook
    (``warm_worker``), their thread count (``federation.torch_threads``), and their priority
    (``WORKER_NICENESS_ENV``). Flower's ``PYTHONPATH`` hand-over is kept: the workers import fedmsk
    from the driver's ``sys.path``.
    """
    import ray

    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PYTHONPATH"] = pythonpath
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not cfg.simulation.ray_address:
        os.environ.setdefault(WORKER_NICENESS_ENV, "0")
        os.environ.setdefault(TASK_EVENTS_ENV, "0")
        # a worker must register within 60 s by default; a loaded machine (load 170 seen here) needs longer
        os.environ.setdefault("RAY_worker_register_timeout_seconds", "300")
    threads = str(max(1, cfg.federation.torch_threads))
    env_vars = {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    init_args = backend_config(cfg)["init_args"]
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            ray.init(runtime_env={"env_vars": env_vars, "worker_process_setup_hook": WARM_HOOK}, **init_args)
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for this
            if "timed out during startup" not in str(exc):
                raise
            ray.shutdown()
            log.warning("Ray did not start within its 30 s (attempt %d of %d): %s", attempt, RAY_START_ATTEMPTS, exc)
    raise RuntimeError(f"Ray's local node did not start within 30 s, {RAY_START_ATTEMPTS} times: the machine is too loaded "
                       f"to start Ray's processes (Ray's own limit, not a fedmsk setting); retry when it is less busy, "
                       f"or run on a started cluster with simulation.ray_address")


def client_gpus(cfg: FedmskConfig) -> float:
    """GPU share per simulated site: ``federation.client_gpus``, or with 0 there, ``device`` not cpu
    and a GPU present, the machine's GPUs split over the sites that train at once.

    Ray hides every GPU from a worker that asked for none (CUDA_VISIBLE_DEVICES=""), so without a
    share ``device=auto`` would find no CUDA inside the simulated sites of a GPU machine.
    """
    if cfg.federation.client_gpus or str(cfg.device).lower() == "cpu":
        return cfg.federation.client_gpus
    import torch

    gpus = torch.cuda.device_count()
    if not gpus:
        return 0.0
    at_once = max(1, (os.cpu_count() or 1) // max(1, cfg.federation.client_cpus))
    return min(1.0, gpus / at_once)


def check_ray_address(address: str | None, timeout_s: float = 3.0) -> None:
    """A cluster address nobody answers on is refused at start, naming the key.

    Without this, ``ray.init`` retries for about a minute inside Flower's backend thread and the
    run dies with a Ray traceback that does not say which setting was wrong. ``auto`` (find the
    cluster this machine's ``ray start`` wrote down) is left to Ray.
    """
    if not address or address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"config 'simulation.ray_address' is '{address}'; give host:port of a running Ray cluster "
                          f"(what `ray start --head` prints), 'auto', or null for a local Ray")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ConfigError(
            f"config 'simulation.ray_address' is '{address}' but no Ray cluster answers there ({exc}); start one with "
            f"`ray start --head --port {port} --node-ip-address {host}` or set simulation.ray_address=null for a local Ray"
        ) from None


def check_minimums(cfg: FedmskConfig, n_sites: int) -> None:
    """Flower waits forever for more nodes than exist: refuse such a config at start."""
    s = cfg.strategy
    worst = max(s.min_available_nodes, s.min_train_nodes, s.min_evaluate_nodes)
    if worst > n_sites:
        raise ConfigError(
            f"strategy minimums ask for {worst} sites but data_root '{cfg.data_root}' has {n_sites}; "
            f"lower strategy.min_available_nodes/min_train_nodes/min_evaluate_nodes"
        )


def simulate(cfg: FedmskConfig, console: Console | None = None) -> dict:
    """Run the federation in one process tree and return the run summary."""
    console = console or Console()
    sites = list_sites(cfg.data_root)
    check_minimums(cfg, len(sites))
    check_ray_address(cfg.simulation.ray_address)
    # Site processes resolve data_root themselves; make it absolute so Ray's workers agree.
    cfg.data_root = str(Path(cfg.data_root).resolve())
    try:
        start_ray(cfg)  # first: the workers warm up while the driver imports and checks the rest
        return _simulate(cfg, sites, console)
    finally:
        import ray

        if ray.is_initialized():  # Flower shuts it down; not when the run failed before its backend started
            ray.shutdown()


def _simulate(cfg: FedmskConfig, sites: list[Path], console: Console) -> dict:
    import torch
    from flwr.simulation import run_simulation

    from client.secagg_app import app as client_app  # plain messages go on to client.app
    from simulation.evaluation import check_side_files, load_federation, load_screener, pooled_test_metrics, run_extras

    use_oracle = check_side_files(cfg, sites, console)  # a foreign oracle.csv is said now, not after training
    run_dir = default_run_dir(cfg, "simulate").resolve()
    # the driver's own torch work (aggregation, checks, the pooled test) must not take the cores the
    # simulated sites train on
    torch.set_num_threads(max(1, cfg.federation.torch_threads))
    console.print(
        f"[bold]fedmsk simulate[/]: {len(sites)} sites ({', '.join(s.name for s in sites)}), "
        f"model {cfg.model.name}, {cfg.rounds} rounds x {cfg.federation.local_epochs} local epochs -> {run_dir}"
    )

    def on_finish(arrays, recorder):  # extras only: a failing one is skipped and named, the run folder is written
        def pooled() -> dict:
            screener = load_screener(cfg, arrays.to_torch_state_dict())
            test = recorder.select(phase="evaluate", split="test", site="global")
            threshold = test[-1].get("threshold", 0.5) if test else 0.5  # the one chosen on validation
            # one site's data in memory at a time: the pooled test keeps only labels and scores
            one_by_one = (entry for folder in sites for entry in load_federation(cfg, [folder]))
            return pooled_test_metrics(screener, cfg, one_by_one, oracle=use_oracle, threshold=threshold)

        return run_extras({"pooled_test": pooled}, console)

    server_app = make_server_app(cfg, run_dir, on_progress=lambda text: console.print("  " + text), on_finish=on_finish)
    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(logging.WARNING)
    # `run_simulation` is the one entry that takes in-process apps and resources; its
    # deprecation notice says nothing a fedmsk user can act on.
    flwr_log.addFilter(lambda record: "DEPRECATED FEATURE" not in record.getMessage())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=len(sites),
            backend_config=backend_config(cfg),
        )
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise RuntimeError(f"the simulation ended without a summary in {run_dir}; see the log above")
    summary = json.loads(summary_path.read_text())
    console.print((run_dir / "summary.md").read_text())
    return summary
