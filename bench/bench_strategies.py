"""Aggregation strategies on the synthetic hospitals, with and without one poisoning site.

For each data mix (a synthetic federation written with its own seed) and training seed, every
strategy federates the same sites; with ``--attack`` one site (site_b) replies with a
sign-flipped, scaled update (``w_global - scale * (w_site - w_global)``), small enough to pass
the update-norm check. The figure is the federation's own pooled test AUC (from the sites'
score histograms). Prints mean and spread over mixes x seeds and writes
bench/results/strategies.json.

The sites run the real ClientApp through the in-process grid the round-loop tests use (no Ray:
Flower's simulation start-up would dominate many small runs).

    python bench/bench_strategies.py [--mixes 2] [--seeds 2] [--scale 10] [--robust-only] [--only a,b] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flwr.app import ArrayRecord, Message  # noqa: E402

from server.federation import run_federation  # noqa: E402
from shared.config import compose  # noqa: E402
from shared.messages import ARRAYS  # noqa: E402
from simulation.synth import write_federation  # noqa: E402
from tests.inprocess_grid import InProcessGrid  # noqa: E402

RESULTS = ROOT / "bench" / "results"
ROBUST = {"fedavg": [], "fedmedian": [], "fedtrimmedavg": [],
          "krum": ["strategy.num_malicious=1", "strategy.min_train_nodes=5"],
          "multikrum": ["strategy.num_malicious=1", "strategy.num_selected=3", "strategy.min_train_nodes=5"]}
OTHERS = {"fedprox": ["strategy.proximal_mu=0.1"], "fedadam": [], "fedyogi": [], "fedbn": []}
ATTACKER = 101  # node of site_b


def sign_flip(scale: float, grid: InProcessGrid):
    def tamper(node: int, reply: Message) -> Message:
        if node != ATTACKER or reply.metadata.message_type != "train" or reply.has_error():
            return reply
        sent = next(m for m in reversed(grid.sent) if m.metadata.dst_node_id == node).content[ARRAYS].to_torch_state_dict()
        local = reply.content[ARRAYS].to_torch_state_dict()
        reply.content[ARRAYS] = ArrayRecord({k: sent[k] - scale * (local[k] - sent[k]) for k in local})
        return reply

    return tamper


def one_run(base: list[str], name: str, extra: list[str], run_dir: Path, attack: float | None) -> dict:
    cfg = compose(base + [f"strategy={name}", *extra, f"run_dir={run_dir}"])
    grid = InProcessGrid({100 + i: {"partition-id": i} for i in range(cfg.num_sites)})
    if attack:
        grid.tamper = sign_flip(attack, grid)
    t0 = time.perf_counter()
    run_federation(grid, cfg, run_dir)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    test = [r for r in rows if r["phase"] == "evaluate" and r["split"] == "test" and r["site"] == "global"][-1]
    return {"auc": test["auc"], "seconds": time.perf_counter() - t0}


def mix_oracle_auc(base: list[str]) -> float | None:
    """The generator's latent score on the same pooled test patients (the best any model could do)."""
    from simulation.evaluation import load_federation, split_patient_ids
    from simulation.oracle import oracle_auc

    cfg = compose(base)
    keys = [(folder.name, pid) for folder, site, _ in load_federation(cfg) for pid in split_patient_ids(site, cfg, "test")]
    return oracle_auc(cfg.data_root, keys)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mixes", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--scale", type=float, default=10.0)
    ap.add_argument("--out", default="runs/bench-strategies")
    ap.add_argument("--robust-only", action="store_true", help="skip fedprox/fedadam/fedyogi/fedbn (no attack)")
    ap.add_argument("--only", default="", help="comma-separated strategies to run (default: all)")
    ap.add_argument("--json", default="strategies.json", help="file name under bench/results/")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    base_overrides = ["num_sites=5", "model=clinical_only", "rounds=5", "federation.local_epochs=2", *args.overrides]
    results = []
    for mix in range(args.mixes):
        root = out / f"mix{mix}"
        if not root.exists():
            write_federation(compose(base_overrides + [f"data_root={root}", f"seed={100 + mix}"]))
        for seed in range(args.seeds):
            base = base_overrides + [f"data_root={root}", f"seed={seed}"]
            oracle = mix_oracle_auc(base)
            print(f"mix{mix} seed{seed}: oracle AUC on the pooled test patients {oracle:.3f}", flush=True)
            plan = [(n, e, None) for n, e in ROBUST.items()] + [(n, e, args.scale) for n, e in ROBUST.items()]
            plan += [] if args.robust_only else [(n, e, None) for n, e in OTHERS.items()]
            plan = [p for p in plan if not args.only or p[0] in args.only.split(",")]
            for name, extra, attack in plan:
                tag = f"{name}-{'attack' if attack else 'clean'}-mix{mix}-seed{seed}"
                r = one_run(base, name, extra, out / "runs" / tag, attack)
                results.append({"strategy": name, "attack": bool(attack), "mix": mix, "seed": seed, "oracle_auc": oracle, **r})
                print(f"{tag}: test AUC {r['auc']:.3f} ({r['seconds']:.0f} s)", flush=True)
    table = {}
    for r in results:
        table.setdefault((r["strategy"], r["attack"]), []).append(r["auc"])
    oracles = sorted({(r["mix"], r["seed"], r["oracle_auc"]) for r in results})
    print("\noracle AUC per mix/seed: " + ", ".join(f"mix{m} seed{s}: {o:.3f}" for m, s, o in oracles))
    print("| strategy | one site sign-flipped x%g | pooled test AUC mean | sd | runs |" % args.scale)
    print("|---|---|---|---|---|")
    summary = []
    for (name, attack), aucs in table.items():
        sd = statistics.stdev(aucs) if len(aucs) > 1 else 0.0
        print(f"| {name} | {'yes' if attack else 'no'} | {statistics.mean(aucs):.3f} | {sd:.3f} | {len(aucs)} |")
        summary.append({"strategy": name, "attack": attack, "auc_mean": statistics.mean(aucs), "auc_sd": sd, "n": len(aucs)})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / args.json).write_text(json.dumps({"config": base_overrides, "scale": args.scale,
                                                         "oracle": oracles, "summary": summary, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
