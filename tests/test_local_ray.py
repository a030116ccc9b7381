"""The local Ray that `fedmsk simulate` starts (simulation.runner.start_ray): workers that are warm
before they are given a site, and no per-task state that grows with the rounds.

One Ray for the module (a start costs seconds); each test reads it without changing it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from shared.config import compose
from simulation import runner


def test_a_config_the_compose_refuses_starts_no_ray(monkeypatch):
    """start_ray_early starts nothing on a config it cannot compose; the full compose says why."""
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray is up in this process")
    runner.start_ray_early(["federation.client_cpus=not-a-number"])
    assert runner._EARLY.thread is None and not ray.is_initialized()


@pytest.fixture(scope="module")
def local_ray():
    import ray

    saved = dict(os.environ)
    assert not ray.is_initialized()
    runner.start_ray(compose(["federation.client_cpus=1", "federation.torch_threads=1"]))
    yield ray, saved
    runner.stop_ray()
    os.environ.clear()
    os.environ.update(saved)  # start_ray leaves Ray's own settings and PYTHONPATH for the processes it starts


def _idle_workers() -> set[int]:
    """This process's Ray workers that no task or actor has taken yet."""
    import psutil

    idle = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if "ray::IDLE" in " ".join(proc.cmdline()):
                idle.add(proc.pid)
        except psutil.Error:
            continue
    return idle


def test_a_site_plays_on_a_worker_that_was_warm_before_it_got_the_site(local_ray):
    """The actor takes one of the workers the raylet prestarted (no new process after the pool is built), and
    that process imported the ClientApp when it started."""
    ray, _ = local_ray
    deadline = time.monotonic() + 120
    while not (prestarted := _idle_workers()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert prestarted, "the raylet prestarted no worker"

    @ray.remote(num_cpus=1)
    class Site:
        def state(self):
            import torch

            return {"warm": [m for m in ("simulation.ray_preload", "client.secagg_app", "monai.data") if m in sys.modules],
                    "threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS")}

        def pid(self):
            return os.getpid()

    site = Site.remote()
    state = ray.get(site.state.remote(), timeout=240)
    assert ray.get(site.pid.remote()) in prestarted
    assert state["warm"] == ["simulation.ray_preload", "client.secagg_app", "monai.data"]  # the actor's process imported them at its start
    assert state["threads"] == 1 and state["omp"] == "1"
    ray.kill(site)


def test_the_workers_settings_stay_out_of_the_drivers_environment(local_ray):
    """The raylet took the workers' thread count and preload list; the driver's own are as before."""
    _, before = local_ray
    assert runner.PRELOAD_ENV not in os.environ
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        assert os.environ.get(key) == before.get(key)


def test_a_local_ray_keeps_no_task_records_that_grow_with_rounds(local_ray):
    """The GCS's per-task records were the round-over-round growth of a long simulation; fedmsk's local Ray keeps none."""
    from ray._private import state

    ray, _ = local_ray
    assert os.environ[runner.TASK_EVENTS_ENV] == "0"

    @ray.remote(num_cpus=1)
    class Counter:
        def step(self, n):
            return n + 1

    counter = Counter.remote()
    assert ray.get([counter.step.remote(i) for i in range(30)], timeout=240) == list(range(1, 31))
    time.sleep(1.5)  # past Ray's default 1 s report interval, had it been on
    assert state.state._connect_and_get_accessor().get_task_events() == []
    ray.kill(counter)


def test_fedmsk_does_not_phone_home_from_its_own_process():
    """Flower's telemetry is read when flwr is first imported: a fedmsk verb's process has it off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
    code = "import cli.main, flwr.supercore.telemetry as t; print(t.FLWR_TELEMETRY_ENABLED)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "0"
