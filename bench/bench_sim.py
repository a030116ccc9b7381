"""`fedmsk simulate` against a plain sequential loop over the same sites and the same work.

Both sides are timed as fresh processes (Python start-up and imports included), one after the
other in one run, on the same federation (``--sites`` small sites, MM-CL):

* ``simulate``: ``fedmsk simulate`` (Flower's simulation engine, Ray workers).
* ``loop``: the same round loop (server.federation.run_federation: validation, recording, the
  same rounds and evaluations) driving the ClientApp's train/evaluate handlers one site after
  the other in one process (tests.inprocess_grid), so ``client.trainer.train_local`` /
  ``evaluate`` do the same work without Flower's engine or Ray; then the same pooled test
  evaluation and summary as ``simulate``.

The figure is simulate / loop wall time; the AUCs show both did the same work. ``--profile``
first times, in one process, what fedmsk adds to a message around the training itself (config
parse, site resolution, data cache miss and hit, model build, weight load, the reply, the
message's pickled size and time as Ray ships it), beside train_local and evaluate.

    python bench/bench_sim.py [--sites 10] [--rounds 3] [--repeats 1] [--profile] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
FEDMSK = str(Path(sys.executable).with_name("fedmsk"))


def plain_loop(overrides: list[str]) -> None:
    """The loop side, run in its own process by ``main``: the rounds, then the same extras as
    ``simulation.runner.simulate`` (pooled test evaluation with the oracle, the summary)."""
    from rich.console import Console

    from client.site import list_sites
    from server.federation import run_federation
    from shared.config import compose
    from simulation.evaluation import check_side_files, load_federation, load_screener, pooled_test_metrics
    from tests.inprocess_grid import InProcessGrid

    cfg = compose(overrides)
    sites = list_sites(cfg.data_root)
    use_oracle = check_side_files(cfg, sites, Console())
    grid = InProcessGrid({100 + i: {"partition-id": i} for i in range(cfg.num_sites)})
    arrays, recorder = run_federation(grid, cfg, Path(cfg.run_dir))
    screener = load_screener(cfg, arrays.to_torch_state_dict())
    recorder.finish(arrays, {"pooled_test": pooled_test_metrics(screener, cfg, load_federation(cfg, sites), oracle=use_oracle)})
    import gc

    gc.freeze()  # as the `fedmsk` command does at exit (cli.main.main): both sides skip Python's final collection


def profile_message(overrides: list[str], repeats: int = 20) -> dict[str, float]:
    """Milliseconds per message of each piece of a ClientApp train/evaluate message at site 0 (median of ``repeats``)."""
    import pickle

    import torch
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import client.app as app
    from client.privacy import resolve_policy
    from client.site import resolve_site
    from client.trainer import build_screener, evaluate, make_loader, train_local
    from shared.config import compose, from_yaml, to_yaml
    from shared.messages import ARRAYS, CONFIG, JOB_KEY, state_to_record

    torch.set_num_threads(1)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0  # what a Message needs outside a run
    cfg = compose(overrides)
    job = to_yaml(cfg)
    weights = build_screener(cfg).state_dict()
    node = {"partition-id": 0}
    site = resolve_site(node, cfg)
    out: dict[str, list[float]] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        value = fn()
        out.setdefault(name, []).append(1000 * (time.perf_counter() - t0))
        return value

    for _ in range(repeats):
        timed("config parse (uncached)", lambda: from_yaml(job))
        timed("site + policy resolution", lambda: (resolve_site(node, cfg), resolve_policy(node, cfg.privacy, site.data_dir)))
        app.SITE_CACHE.clear()
        timed("site data: cache miss (disk cache)", lambda: app._site_datasets(str(site.data_dir), job, cfg.seed, False))
        data = timed("site data: cache hit", lambda: app._site_datasets(str(site.data_dir), job, cfg.seed, False))
        screener = timed("model build", lambda: build_screener(cfg))
        timed("weight load", lambda: screener.load_state_dict(weights))
        msg = Message(RecordDict({ARRAYS: state_to_record(weights), CONFIG: ConfigRecord({JOB_KEY: job})}), dst_node_id=1,
                      message_type="train")
        timed("message pickle + unpickle (Ray)", lambda: pickle.loads(pickle.dumps(msg)))
        timed("train_local (1 epoch)", lambda: train_local(screener, make_loader(data["train"], cfg.federation.batch_size,
                                                                               shuffle=True, seed=0), cfg.federation, "cpu"))
        timed("evaluate (val)", lambda: evaluate(screener, make_loader(data["val"], cfg.federation.batch_size, shuffle=False,
                                                                     seed=0), "cpu"))
        timed("reply state + record", lambda: state_to_record({k: v.detach().cpu() for k, v in screener.state_dict().items()}))
    return {k: statistics.median(v) for k, v in out.items()}


def test_auc(run_dir: Path) -> float:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["phase"] == "evaluate" and r["split"] == "test" and r["site"] == "global"][-1]["auc"]


def timed(cmd: list[str], run_dir: Path) -> dict:
    load = os.getloadavg()[0]  # a loaded machine slows the side that runs then; said beside the figure
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return {"seconds": seconds, "auc": test_auc(run_dir), "load_1min_at_start": load}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--patients", default="40", help="patients per site, or 'default' for the generator's "
                    "(180/140/100, what `make demo` trains on)")
    ap.add_argument("--out", default="runs/bench-sim")
    ap.add_argument("--json", default="sim.json", help="file name under bench/results/")
    ap.add_argument("--profile", action="store_true", help="time the pieces of one message first")
    ap.add_argument("--plain-loop", action="store_true", help=argparse.SUPPRESS)  # the loop side's own process
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.plain_loop:
        plain_loop(args.overrides)
        return
    from shared.config import compose
    from simulation.synth import write_federation

    out = Path(args.out).resolve()
    small = args.patients != "default"
    root = out / (f"sites{args.sites}" if args.patients == "40" else f"sites{args.sites}-p{args.patients}")
    sizes = [f"synth.patients_per_site=[{int(args.patients)}]", "synth.prevalence=[0.3]", "synth.missing_rate=[0.05]"] if small else []
    base = [f"num_sites={args.sites}", f"rounds={args.rounds}", "model=mmcl", "federation.local_epochs=1", *sizes,
            f"data_root={root}", *args.overrides]
    if not root.exists():
        write_federation(compose(base))
    profile = None
    if args.profile:
        profile = profile_message(base)
        print("| piece of a message | ms (median) |\n|---|---|")
        for name, ms in profile.items():
            print(f"| {name} | {ms:.1f} |")
    runs = []
    for rep in range(args.repeats):
        for side in ("simulate", "loop"):
            run_dir = out / "runs" / f"{side}-{rep}"
            over = base + [f"run_dir={run_dir}"]
            cmd = [FEDMSK, "simulate", *over] if side == "simulate" else [sys.executable, __file__, "--plain-loop", *over]
            r = timed(cmd, run_dir) | {"side": side, "repeat": rep}
            runs.append(r)
            print(f"{side} #{rep}: {r['seconds']:.1f} s, test AUC {r['auc']:.3f}", flush=True)
    sim = [r["seconds"] for r in runs if r["side"] == "simulate"]
    loop = [r["seconds"] for r in runs if r["side"] == "loop"]
    ratio = [s / lp for s, lp in zip(sim, loop)]
    print(f"\n| sites x rounds | simulate s | plain loop s | simulate / loop |\n|---|---|---|---|\n"
          f"| {args.sites} x {args.rounds} | {statistics.mean(sim):.1f} | {statistics.mean(loop):.1f} | "
          f"{statistics.mean(ratio):.2f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / args.json).write_text(json.dumps({"config": base, "cpus": os.cpu_count(), "ratio_mean": statistics.mean(ratio),
                                                 "runs": runs, "message_profile_ms": profile}, indent=2))


if __name__ == "__main__":
    main()
