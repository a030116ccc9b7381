"""`fedmsk simulate` against a plain sequential loop over the same sites and the same work.

Both sides are timed as fresh processes (Python start-up and imports included), one after the
other in one run, on the same federation (``--sites`` small sites, MM-CL):

* ``simulate``: ``fedmsk simulate`` (Flower's simulation engine, Ray workers).
* ``loop``: the same round loop (server.federation.run_federation: validation, recording, the
  same rounds and evaluations) driving the ClientApp's train/evaluate handlers one site after
  the other in one process (tests.inprocess_grid), so ``client.trainer.train_local`` /
  ``evaluate`` do the same work without Flower's engine or Ray; then the same pooled test
  evaluation and summary as ``simulate``.

The figure is simulate / loop wall time; the AUCs show both did the same work.

    python bench/bench_sim.py [--sites 10] [--rounds 3] [--repeats 1] [overrides ...]
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


def test_auc(run_dir: Path) -> float:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["phase"] == "evaluate" and r["split"] == "test" and r["site"] == "global"][-1]["auc"]


def timed(cmd: list[str], run_dir: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return {"seconds": seconds, "auc": test_auc(run_dir)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default="runs/bench-sim")
    ap.add_argument("--json", default="sim.json", help="file name under bench/results/")
    ap.add_argument("--plain-loop", action="store_true", help=argparse.SUPPRESS)  # the loop side's own process
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.plain_loop:
        plain_loop(args.overrides)
        return
    from shared.config import compose
    from simulation.synth import write_federation

    out = Path(args.out).resolve()
    root = out / f"sites{args.sites}"
    base = [f"num_sites={args.sites}", f"rounds={args.rounds}", "model=mmcl", "federation.local_epochs=1",
            f"synth.patients_per_site=[40]", "synth.prevalence=[0.3]", "synth.missing_rate=[0.05]",
            f"data_root={root}", *args.overrides]
    if not root.exists():
        write_federation(compose(base))
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
                                                 "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
