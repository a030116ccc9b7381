"""Osteoporosis from hand radiographs: segmentation-for-classification vs a plain image CNN, and
the few-labels table, on synthetic hand hospitals (simulation/synth_hand.py), oracle beside.

Table "main" (per seed): ``image_only`` (the plain CNN), ``segclass`` with the sites' masks, and
``segclass`` with the masks ignored (``task.mask_labels=[]``: its U-Net never trains), each
federated (FedAvg through fedmsk's real round loop in one process, bench_quality's harness),
pooled (all training patients together, same epochs), and federated under DP-SGD
(``privacy=eps8``, segmentation loss kept: it is per-sample; the preset's DP optimiser and lr,
chosen under DP on the sarcopenia federations, not re-tuned here). Without DP every model uses
``federation.lr=0.003`` (not tuned per model).

Table "fewlabels": federated segclass with ``task.label_fraction`` 0.1 / 0.25 / 1.0 of each
site's training labels, from random init vs from public pretraining (``fedmsk pretrain-public``
on a separate synthetic "public" federation: other seed, same generator, labels and masks used).

Every figure is the AUC on all sites' test patients pooled (exact, researcher side) with the
oracle AUC on the same patients; mean ± SD over seeds. Writes bench/results/osteo_hand.json
and prints the Markdown tables the README carries.

    python bench/bench_osteo_hand.py [--seeds 0,1] [--workers 2] [--tables main,fewlabels] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(RESULTS.parent.parent))  # the repo root (tests.inprocess_grid)
sys.path.insert(0, str(RESULTS.parent))  # bench_quality's federated / pooled harness

VARIANTS = {  # name -> (model, extra overrides)
    "image_only": ("image_only", []),
    "segclass": ("segclass", []),
    "segclass_no_masks": ("segclass", ["task.mask_labels=[]"]),
}
MODES = {"federated": [], "pooled": [], "federated_dp": ["privacy=eps8"]}  # the preset keeps segclass's own loss (model.dp_aux_loss)
FRACTIONS = (0.1, 0.25, 1.0)


def run_job(job: dict) -> dict:
    """One run in a worker process (cached in job['cache'] so an interrupted bench resumes)."""
    import torch

    import bench_quality as bq
    from shared.config import compose

    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    cache = Path(job["cache"])
    if cache.is_file():
        return json.loads(cache.read_text())
    if job["cached_only"]:
        return {}
    overrides = list(job["overrides"])
    if job.get("pretrain"):
        overrides.append(f"model.pretrained_path={Path(job['pretrain']['run_dir']) / 'encoder.pt'}")
    cfg = compose(overrides)
    start = time.perf_counter()
    metrics = bq._pooled(cfg) if job["mode"] == "pooled" else bq._federated(cfg, Path(job["run_dir"]))
    row = {k: job[k] for k in ("table", "seed", "mode", "variant", "fraction", "init")} | metrics
    row["seconds"] = round(time.perf_counter() - start, 1)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(row))
    print(f"  {row['table']} seed {row['seed']} {row['mode']:12s} {row['variant']:18s} frac {row['fraction']} "
          f"{row['init']:6s} AUC {row['auc']:.3f} (oracle {row['oracle_auc']:.3f}) {row['seconds']:.0f} s", flush=True)
    return row


def pretrain(spec: dict) -> str:
    """segclass pretrained on the public federation of one seed (`fedmsk pretrain-public`), once."""
    import torch
    from rich.console import Console

    from shared.config import compose
    from simulation.pretrain_public import WEIGHTS, pretrain_public

    torch.set_num_threads(1)
    run_dir = Path(spec["run_dir"])
    if not (run_dir / WEIGHTS).is_file():
        pretrain_public(compose(spec["overrides"] + [f"run_dir={run_dir}"]), Console(quiet=True))
    return str(run_dir / WEIGHTS)


def _mean_sd(values: list[float]) -> list[float]:
    a = np.asarray(values, dtype=float)
    return [float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0]


def summarise(rows: list[dict]) -> dict:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(f"{r['table']}/{r['mode']}/{r['variant']}/{r['fraction']}/{r['init']}", []).append(r)
    return {k: {"n": len(rs), "auc": _mean_sd([r["auc"] for r in rs]), "oracle_auc": _mean_sd([r["oracle_auc"] for r in rs]),
                "sen": _mean_sd([r["sen"] for r in rs]), "spc": _mean_sd([r["spc"] for r in rs]),
                "seconds": _mean_sd([r["seconds"] for r in rs])} for k, rs in sorted(groups.items())}


def markdown(summary: dict) -> str:
    def cell(key: str) -> str:
        e = summary.get(key)
        return f"{e['auc'][0]:.3f} ± {e['auc'][1]:.3f}" if e else "-"

    def oracle(keys: list[str]) -> str:
        e = next((summary[k] for k in keys if k in summary), None)
        return f"{e['oracle_auc'][0]:.3f}" if e else "-"

    lines = ["| model | federated | pooled | federated, DP ε=8 | oracle |", "|---|---|---|---|---|"]
    for v in VARIANTS:
        keys = [f"main/{m}/{v}/1.0/random" for m in MODES]
        if any(k in summary for k in keys):
            lines.append(f"| {v} | " + " | ".join(cell(k) for k in keys) + f" | {oracle(keys)} |")
    few = [k for k in summary if k.startswith("fewlabels/")]
    if few:
        lines += ["", "| segclass, federated | " + " | ".join(f"{f:.0%} labels" for f in FRACTIONS) + " | oracle |",
                  "|---" * (len(FRACTIONS) + 2) + "|"]
        for init in ("random", "public"):
            keys = [f"fewlabels/federated/segclass/{f}/{init}" if (f, init) != (1.0, "random")
                    else "main/federated/segclass/1.0/random" for f in FRACTIONS]
            lines.append(f"| {init} init | " + " | ".join(cell(k) for k in keys) + f" | {oracle(keys)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tables", default="main,fewlabels")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", default="runs/bench-osteo-hand")
    ap.add_argument("--summarise-only", action="store_true", help="tabulate the runs already cached, start none")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    seeds = [int(s) for s in args.seeds.split(",")]
    # 3 small hospitals (site_a masks as PNG, site_b none, site_c as DICOM SEG): the grid fits a shared 2-core machine
    base = ["task=osteoporosis_hand", "num_sites=3", "synth.patients_per_site=[100,80,90]", "synth.image_size=64",
            "task.image_size=[48,48]", "rounds=4", "federation.local_epochs=3", "federation.lr=0.003", "model.width=8",
            *args.overrides]
    from shared.config import TaskConfig, compose
    from simulation.generators import write_federation

    tables = args.tables.split(",")
    has_fraction = hasattr(TaskConfig, "label_fraction")
    if "fewlabels" in tables and not has_fraction:
        print("task.label_fraction is not in this tree (issue 14): the few-labels table is skipped")
        tables.remove("fewlabels")
    jobs, pretrains = [], []
    for seed in seeds:
        root = out / "data" / f"s{seed}"
        public = out / "data" / f"public_s{seed}"
        over = base + [f"seed={seed}", f"data_root={root}"]
        if not (root / "oracle.csv").is_file():
            write_federation(compose(over))
        common = {"seed": seed, "fraction": 1.0, "init": "random", "pretrain": None, "cached_only": args.summarise_only}
        if "main" in tables:
            for mode in args.modes.split(","):
                for variant in args.variants.split(","):
                    if mode == "federated_dp" and variant == "segclass_no_masks":
                        continue  # DP rows: the plain CNN and segclass with masks
                    (model, extra), mode_over = VARIANTS[variant], MODES[mode]
                    key = f"main_s{seed}_{mode}_{variant}"
                    jobs.append(common | {"table": "main", "mode": mode, "variant": variant,
                                          "overrides": over + [f"model={model}", *extra, *mode_over],
                                          "cache": str(out / "jobs" / f"{key}.json"), "run_dir": str(out / "runs" / key)})
        if "fewlabels" in tables:
            pub_over = base + [f"seed={seed + 100}", f"data_root={public}", "num_sites=2", "model=segclass"]
            if not (public / "oracle.csv").is_file():
                write_federation(compose(pub_over))
            public_run = {"overrides": pub_over, "run_dir": str(out / "pretrain" / f"s{seed}")}
            pretrains.append(public_run)
            for fraction in FRACTIONS:
                for init in ("random", "public"):
                    main_run = out / "jobs" / f"main_s{seed}_federated_segclass.json"
                    if fraction == 1.0 and init == "random" and (main_run.is_file() or "main" in tables):
                        continue  # the main table's federated segclass run (same data, seed and config)
                    key = f"few_s{seed}_{fraction}_{init}"
                    jobs.append(common | {"table": "fewlabels", "mode": "federated", "variant": "segclass",
                                          "fraction": fraction, "init": init,
                                          "pretrain": public_run if init == "public" else None,
                                          "overrides": over + ["model=segclass", f"task.label_fraction={fraction}"],
                                          "cache": str(out / "jobs" / f"{key}.json"), "run_dir": str(out / "runs" / key)})
    print(f"bench_osteo_hand: {len(jobs)} runs, {len(seeds)} seeds, {args.workers} workers -> {out}", flush=True)
    start = time.perf_counter()
    jobs.sort(key=lambda j: (j["table"] != "main", j["mode"] != "federated", j["seed"]))
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        list(pool.map(pretrain, [] if args.summarise_only else pretrains))
        rows = [r for r in pool.map(run_job, jobs) if r]
    summary = summarise(rows)
    RESULTS.mkdir(exist_ok=True)
    result = {"overrides": base, "seeds": seeds, "label_fraction_available": has_fraction, "rows": rows,
              "summary": summary, "wall_seconds": round(time.perf_counter() - start)}
    (RESULTS / "osteo_hand.json").write_text(json.dumps(result, indent=2))
    print(markdown(summary))


if __name__ == "__main__":
    main()
