"""`fedmsk simulate`: every site folder of a data root as one simulated hospital, through
Flower's simulation engine, with the same ClientApp and ServerApp as a real deployment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import warnings
from pathlib import Path

from rich.console import Console

from client.site import list_sites
from shared.config import ConfigError, FedmskConfig, compose

# as cli.main: a simulation started from Python (flwr not imported yet) does not phone home either
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

# Nothing heavy at module level: `fedmsk simulate` starts Ray (and with it the workers' own imports,
# simulation.ray_preload) before the driver imports torch, Flower and the ServerApp (in _simulate).


def warn_inflated_encoder(cfg: FedmskConfig, console: Console) -> None:
    """Say so before training when ``model.pretrained_path``'s card flags the encoder's feature scale
    (shared.ssl.feature_scale: DP pretraining noise inflated it, and the fine-tune may start saturated)."""
    from shared.provenance import provenance

    card = provenance(cfg.model.pretrained_path) or {}
    warning = (card.get("feature_scale") or {}).get("warning")
    if warning:
        console.print(f"[yellow]warning[/]: {cfg.model.pretrained_path}: {warning}")


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
WARM_HOOK = "simulation.ray_preload.warm"  # a joined cluster's workers run it when they start
# a local Ray's workers import it when they start (Ray's preload_python_modules setting)
PRELOAD_ENV, PRELOAD_MODULE = "RAY_preload_python_modules", "simulation.ray_preload"
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


class _EarlyStart:
    """A local Ray started by a thread while the caller goes on (``start_ray_early``).

    The thread lives until ``stop_ray``: Ray starts its GCS and raylet with the parent-death signal
    set (Linux ``PR_SET_PDEATHSIG``), which fires when the *thread* that started them ends, so a
    thread that returned after ``ray.init`` would take the whole local Ray down with it.
    """

    thread: threading.Thread | None = None
    started = threading.Event()
    release = threading.Event()
    error: BaseException | None = None


_EARLY = _EarlyStart()


def start_ray_early(overrides: list[str]) -> None:
    """Start Ray in a thread, from a compose without the training checks, so that Ray's own start
    (2-3 s here) and its workers' imports (simulation.ray_preload) overlap the driver importing
    torch, Flower and the training checks and composing again with them.

    Nothing starts when that compose or the cluster address is refused: the full compose, or
    ``simulate``, then says why as it would have. ``start_ray`` waits for this start; a caller
    whose full compose then fails calls ``stop_ray``.
    """
    try:
        cfg = compose(overrides)
        check_ray_address(cfg.simulation.ray_address)
    except ConfigError:
        return
    _EARLY.started.clear()
    _EARLY.release.clear()
    _EARLY.error = None

    def run() -> None:
        try:
            start_ray(cfg)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's start_ray
            _EARLY.error = exc
        finally:
            _EARLY.started.set()
        _EARLY.release.wait()  # Ray's processes live as long as the thread that started them

    _EARLY.thread = threading.Thread(target=run, name="fedmsk-ray-start", daemon=True)
    _EARLY.thread.start()


def stop_ray() -> None:
    """Shut down the Ray this process started (early or not), if it is up."""
    import ray

    if _EARLY.thread is not None:
        _EARLY.started.wait()
    if ray.is_initialized():
        ray.shutdown()
    if _EARLY.thread is not None:
        _EARLY.release.set()
        _EARLY.thread.join()
        _EARLY.thread = None


def start_ray(cfg: FedmskConfig) -> None:
    """Start (or join) Ray before Flower's backend would, with the settings a simulated site needs.

    Flower's ``RayBackend.init_ray`` does nothing when Ray is already up, and ``run_simulation``
    shuts it down at the end. What this adds to Flower's own start: the workers' warm-up
    (``simulation.ray_preload``), their thread count (``federation.torch_threads``), and their
    priority (``WORKER_NICENESS_ENV``). Flower's ``PYTHONPATH`` hand-over is kept: the workers
    import fedmsk from the driver's ``sys.path``.

    A local Ray gets these through the environment its raylet inherits, not through a job
    ``runtime_env``: the raylet prestarts one worker per CPU as the driver connects, and only
    workers of the job's own runtime env can become Flower's ClientApp actors. With a runtime env
    (Flower's way, and fedmsk's before) the prestarted workers idle and each actor waits for a
    new process and its imports after Flower builds its pool (measured here: actors ready 14 s
    after start against 6 s). A cluster joined through ``simulation.ray_address`` started its
    workers elsewhere, so they get the settings as a runtime env and the warm-up as a setup hook.
    """
    if _EARLY.thread is not None and threading.current_thread() is not _EARLY.thread:
        _EARLY.started.wait()  # started by start_ray_early: its error is this start's error
        error, _EARLY.error = _EARLY.error, None
        if error is not None:
            raise error
    import ray

    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PYTHONPATH"] = pythonpath
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    threads = str(max(1, cfg.federation.torch_threads))
    env_vars = {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if cfg.simulation.ray_address:
        runtime_env, raylet_env = {"env_vars": env_vars, "worker_process_setup_hook": WARM_HOOK}, {}
    else:
        os.environ.setdefault(WORKER_NICENESS_ENV, "0")
        os.environ.setdefault(TASK_EVENTS_ENV, "0")
        # a worker must register within 60 s by default; a loaded machine (load 170 seen here) needs longer
        os.environ.setdefault("RAY_worker_register_timeout_seconds", "300")
        runtime_env, raylet_env = None, env_vars | {PRELOAD_ENV: PRELOAD_MODULE}
    init_args = backend_config(cfg)["init_args"]
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            with _environ(raylet_env):  # the raylet and its workers keep them; the driver's own threads stay as set
                ray.init(runtime_env=runtime_env, **init_args)
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for this
            if "timed out during startup" not in str(exc):
                raise
            ray.shutdown()
            log.warning("Ray did not start within its 30 s (attempt %d of %d): %s", attempt, RAY_START_ATTEMPTS, exc)
    raise RuntimeError(f"Ray's local node did not start within 30 s, {RAY_START_ATTEMPTS} times: the machine is too loaded "
                       f"to start Ray's processes (Ray's own limit, not a fedmsk setting); retry when it is less busy, "
                       f"or run on a started cluster with simulation.ray_address")


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """``values`` in os.environ for the block (what processes started in it inherit), then as before."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
        stop_ray()  # Flower shuts it down; not when the run failed before its backend started


def _simulate(cfg: FedmskConfig, sites: list[Path], console: Console) -> dict:
    import torch
    from flwr.simulation import run_simulation

    from client.secagg_app import app as client_app  # plain messages go on to client.app
    from server.app import default_run_dir, make_server_app
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
    warn_inflated_encoder(cfg, console)

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
