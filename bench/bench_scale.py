"""How many small sites `fedmsk simulate` runs on one machine, and whether its memory stays flat.

Each size is one `fedmsk simulate` process (MM-CL, sites of 40 patients); a sampler thread sums
the resident memory (psutil RSS, and PSS: ``tree_rss``) of that process and every descendant (Ray's
GCS, raylet, agents and the ClientApp workers) every ``--interval`` s. Per run: the peak of the tree, and per
round the tree's memory when the round's validation ends (the ``round k/R: val`` progress line)
and its peak during the round. Two parts:

* ``scale``: ``--sites`` sizes (default 10 50 200), ``--rounds`` rounds each; the figure is the
  peak at N sites / the peak at the smallest N (goal: within +-5 %).
* ``leak``: ``--leak-sites`` sites for ``--leak-rounds`` rounds; the figure is the memory after
  round ``--leak-rounds`` / after round 2 (goal: no growth).

Cheap by design on a loaded 2-core machine: tiny images (``--image-size``, default 32), one
local step (batch size above a site's training split), few rounds.

    python bench/bench_scale.py [--sites 10 50 200] [--rounds 3] [--leak-sites 20] [--leak-rounds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
FEDMSK = str(Path(sys.executable).with_name("fedmsk"))
ROUND_DONE = re.compile(r"round (\d+)/(\d+): val AUC")


def component(proc: psutil.Process, root: psutil.Process) -> str:
    """Which part of the tree a process is: the driver (ServerApp + simulation engine), a Ray worker
    (ClientApps), or Ray's own services (GCS, raylet, agents, log monitor)."""
    if proc.pid == root.pid:
        return "driver"
    try:
        line = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "ray_services"
    return "ray_workers" if "default_worker.py" in line or line.startswith("ray::") else "ray_services"


def tree_rss(root: psutil.Process) -> tuple[int, int, dict[str, int]]:
    """(bytes, processes, bytes per component) of ``root`` and all its descendants; processes that
    ended meanwhile are skipped.

    Per component, ``<name>`` is the RSS sum and ``<name>_pss`` the PSS sum (Linux smaps: a shared
    page counts 1/n in each of the n processes mapping it), and ``pss`` the tree's PSS. RSS counts
    every page a process maps: shared libraries in each process, and the pages of Ray's object store
    (a shared-memory file the raylet and every worker map) in each worker that has read an object
    from there, so a worker's RSS grows as the store's allocator moves through fresh pages though
    nothing is kept. The PSS sum counts each page once.
    """
    total, count = 0, 0
    parts = {"driver": 0, "ray_workers": 0, "ray_services": 0, "driver_pss": 0, "ray_workers_pss": 0,
             "ray_services_pss": 0, "pss": 0}
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0, parts
    for proc in procs:
        try:
            info = proc.memory_full_info()
            name = component(proc, root)
            parts[name] += info.rss
            parts[f"{name}_pss"] += info.pss
            parts["pss"] += info.pss
            total += info.rss
            count += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total, count, parts


def base_overrides(n_sites: int, rounds: int, root: Path, image_size: int) -> list[str]:
    return [f"num_sites={n_sites}", f"rounds={rounds}", "model=mmcl", "federation.local_epochs=1",
            "federation.batch_size=64",  # above a 40-patient site's training split: one local step
            f"task.image_size=[{image_size},{image_size}]", f"synth.image_size={image_size}",
            "synth.patients_per_site=[40]", "synth.prevalence=[0.3]", "synth.missing_rate=[0.05]", f"data_root={root}"]


def run_one(n_sites: int, rounds: int, out: Path, image_size: int, interval: float, extra: list[str] = (),
            env: dict[str, str] | None = None, trace: Path | None = None) -> dict:
    from shared.config import compose
    from simulation.synth import write_federation

    root = out / f"sites{n_sites}"
    over = base_overrides(n_sites, rounds, root, image_size)
    if not root.exists():
        t0 = time.perf_counter()
        write_federation(compose(over))
        print(f"  wrote {n_sites} sites in {time.perf_counter() - t0:.0f} s", flush=True)
    run_dir = out / "runs" / f"sites{n_sites}-rounds{rounds}"
    cmd = [FEDMSK, "simulate", *over, *extra, f"run_dir={run_dir}"]
    run_env = os.environ | {"OMP_NUM_THREADS": "1", "COLUMNS": "200"} | (env or {})
    if trace is not None:  # bench/memtrace/sitecustomize.py: tracemalloc diffs in the driver, per round
        trace.mkdir(parents=True, exist_ok=True)
        for old in [trace / "driver.jsonl", *trace.glob("worker-*.jsonl")]:
            old.unlink(missing_ok=True)
        run_env |= {"FEDMSK_BENCH_TRACE": str(trace),
                    "PYTHONPATH": os.pathsep.join([str(ROOT / "bench" / "memtrace"), run_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=run_env)
    ps = psutil.Process(proc.pid)
    samples: list[tuple[float, int, int, dict[str, int]]] = []
    part_peaks: dict[str, int] = {}  # component -> its own peak
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rss, count, parts = tree_rss(ps)
            if count:
                samples.append((time.perf_counter() - t0, rss, count, parts))
                for name, value in parts.items():
                    part_peaks[name] = max(part_peaks.get(name, 0), value)
            stop.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    marks: dict[int, float] = {}  # round -> seconds when its validation ended
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = (tail + [line])[-60:]
        m = ROUND_DONE.search(line)
        if m:
            marks[int(m.group(1))] = time.perf_counter() - t0
    rc = proc.wait()
    stop.set()
    sampler.join()
    seconds = time.perf_counter() - t0
    if rc != 0 or len(marks) < rounds + 1:
        raise SystemExit(f"fedmsk simulate at {n_sites} sites failed (exit {rc}, rounds seen {sorted(marks)}):\n{''.join(tail)}")
    per_round = []
    prev = 0.0
    for rnd in sorted(marks):
        window = [s for s in samples if prev <= s[0] <= marks[rnd]] or [min(samples, key=lambda s: abs(s[0] - marks[rnd]))]
        at_end = min(samples, key=lambda s: abs(s[0] - marks[rnd]))
        per_round.append({"round": rnd, "seconds": round(marks[rnd], 1), "peak_mb": max(s[1] for s in window) / 2**20,
                          "end_mb": at_end[1] / 2**20, "processes": at_end[2],
                          "end_component_mb": {k: v / 2**20 for k, v in at_end[3].items()}})
        prev = marks[rnd]
    peak = max(samples, key=lambda s: s[1])
    return {"sites": n_sites, "rounds": rounds, "seconds": round(seconds, 1), "env": env or {}, "peak_mb": peak[1] / 2**20,
            "processes_at_peak": peak[2], "component_peak_mb": {k: v / 2**20 for k, v in part_peaks.items()},
            "per_round": per_round, "samples": len(samples)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, nargs="*", default=[10, 50, 200], help="none: the leak run only")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--leak-sites", type=int, default=20)
    ap.add_argument("--leak-rounds", type=int, default=20, help="0 skips the leak run")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    ap.add_argument("--out", default="runs/bench-scale")
    ap.add_argument("--json", default="scale.json", help="file name under bench/results/")
    ap.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE",
                    help="environment for the simulate process tree (e.g. MALLOC_ARENA_MAX=2)")
    ap.add_argument("--trace", action="store_true",
                    help="leak run: tracemalloc diffs of the driver after every round and of each worker every 100 "
                         "messages -> <out>/trace/*.jsonl and the JSON")
    ap.add_argument("overrides", nargs="*", help="more config overrides for every run (e.g. federation.site_cache_mb=0)")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    result: dict = {"machine": f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB",
                    "image_size": args.image_size, "overrides": args.overrides, "scale": [], "leak": None}
    RESULTS.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every run: a long benchmark cut short keeps what it measured
        (RESULTS / args.json).write_text(json.dumps(result, indent=2))

    env = dict(kv.split("=", 1) for kv in args.env)
    result["env"] = env
    for n in args.sites:
        r = run_one(n, args.rounds, out, args.image_size, args.interval, args.overrides, env)
        result["scale"].append(r)
        base = result["scale"][0]["peak_mb"]
        print(f"{n} sites x {args.rounds} rounds: {r['seconds']:.0f} s, peak {r['peak_mb']:.0f} MB "
              f"({r['peak_mb'] / base - 1:+.1%} vs {result['scale'][0]['sites']} sites), {r['processes_at_peak']} processes; "
              + ", ".join(f"{k} peak {v:.0f} MB" for k, v in r["component_peak_mb"].items()), flush=True)
        save()
    if args.leak_rounds:
        trace = out / "trace" if args.trace else None
        r = run_one(args.leak_sites, args.leak_rounds, out, args.image_size, args.interval, args.overrides, env, trace)
        by_round = {x["round"]: x for x in r["per_round"]}
        r["growth_end_mb"] = by_round[args.leak_rounds]["end_mb"] / by_round[2]["end_mb"] - 1
        r["growth_peak_mb"] = by_round[args.leak_rounds]["peak_mb"] / by_round[2]["peak_mb"] - 1
        r["growth_component_mb"] = {k: by_round[args.leak_rounds]["end_component_mb"][k] - v
                                    for k, v in by_round[2]["end_component_mb"].items()}
        r["growth_end_pss"] = by_round[args.leak_rounds]["end_component_mb"]["pss"] / by_round[2]["end_component_mb"]["pss"] - 1
        if trace is not None and (trace / "driver.jsonl").is_file():
            r["driver_trace"] = [json.loads(x) for x in (trace / "driver.jsonl").read_text().splitlines()]
        if trace is not None:  # the workers' own (bench/memtrace/sitecustomize.py, worker branch)
            r["worker_trace"] = {f.stem: [json.loads(x) for x in f.read_text().splitlines()]
                                 for f in sorted(trace.glob("worker-*.jsonl"))}
        result["leak"] = r
        print(f"leak run, {args.leak_sites} sites x {args.leak_rounds} rounds: after round 2 {by_round[2]['end_mb']:.0f} MB, "
              f"after round {args.leak_rounds} {by_round[args.leak_rounds]['end_mb']:.0f} MB ({r['growth_end_mb']:+.1%}); "
              f"peak in round 2 vs {args.leak_rounds}: {r['growth_peak_mb']:+.1%}; round 2 -> {args.leak_rounds} per component: "
              + ", ".join(f"{k} {v:+.1f} MB" for k, v in r["growth_component_mb"].items())
              + f"; PSS of the tree {by_round[2]['end_component_mb']['pss']:.0f} -> "
                f"{by_round[args.leak_rounds]['end_component_mb']['pss']:.0f} MB ({r['growth_end_pss']:+.1%})", flush=True)
        save()
    if result["scale"]:
        base = result["scale"][0]
        print("\n| sites | rounds | wall s | peak MB (process tree) | vs smallest |\n|---|---|---|---|---|")
        for r in result["scale"]:
            print(f"| {r['sites']} | {r['rounds']} | {r['seconds']:.0f} | {r['peak_mb']:.0f} | {r['peak_mb'] / base['peak_mb'] - 1:+.1%} |")


if __name__ == "__main__":
    main()
