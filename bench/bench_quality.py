"""Model quality: every model federated and pooled, over seeds and generator mixes, at the
operating point chosen on validation, with the oracle AUC beside.

For each generator mix (``synth.image_signal`` / ``synth.clinical_signal``) and seed, five
synthetic hospitals are written; then every model is

- federated with FedAvg through fedmsk's real round loop (``server.federation.run_federation``,
  the real ClientApp functions, no Ray: ``tests.inprocess_grid.InProcessGrid``): the pooled
  AUC comes from the sites' score histograms, the threshold is chosen on the pooled validation
  histograms, the final model is the best validation round;
- trained pooled on all training patients for the same number of epochs, validated after each
  ``local_epochs`` like a round, threshold chosen the same way on the pooled validation scores.

Every row is scored on the same test patients of all sites pooled (researcher-side, exact
AUC; for the federated rows the histogram AUC the coordinator saw is kept beside). Jobs run in
``--workers`` processes at one torch thread each; each job's result is cached under
``<out>/jobs/`` so an interrupted bench resumes. Writes bench/results/quality.json and prints
the Markdown table the README carries.

    python bench/bench_quality.py [--seeds 0,1,2] [--mixes balanced:1:1,image:1.5:0.7] [--workers 2] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(RESULTS.parent.parent))  # the repo root: tests.inprocess_grid (run as a script)
MODELS = ("mmcl", "late_fusion", "image_only", "clinical_only", "logreg")
METRICS = ("auc", "acc", "f1", "sen", "spc", "pre")
NEURAL = ("mmcl", "late_fusion", "image_only")  # the slow jobs: started first


def _scores(screener, datasets_of, split: str):
    from client.trainer import make_loader, predict

    ys, ps = [], []
    for datasets in datasets_of:
        y, p, _ = predict(screener, make_loader(datasets[split], 64, shuffle=False, seed=0), "cpu")
        ys.append(y)
        ps.append(p[:, 1])
    return np.concatenate(ys), np.concatenate(ps)


def _test_metrics(screener, cfg, federation, threshold: float) -> dict[str, float]:
    """Exact metrics on all sites' test patients pooled, at ``threshold``, and the oracle AUC."""
    from shared.metrics import classification_metrics
    from simulation.evaluation import split_patient_ids
    from simulation.oracle import oracle_auc

    y, p = _scores(screener, [d for _, _, d in federation], "test")
    m = classification_metrics(y, np.stack([1 - p, p], axis=1), threshold=threshold)
    keys = [(folder.name, pid) for folder, site, _ in federation for pid in split_patient_ids(site, cfg, "test")]
    out = {k: m[k] for k in METRICS}
    out.update(n_test=float(len(y)), threshold=threshold, oracle_auc=oracle_auc(cfg.data_root, keys))
    return out


def _federated(cfg, run_dir: Path) -> dict[str, float]:
    from server.federation import run_federation
    from simulation.evaluation import load_federation, load_screener
    from tests.inprocess_grid import InProcessGrid

    federation = load_federation(cfg)
    grid = InProcessGrid({100 + i: {"partition-id": i} for i in range(len(federation))})
    arrays, recorder = run_federation(grid, cfg, run_dir)
    test = recorder.select(phase="evaluate", split="test", site="global")[-1]
    screener = load_screener(cfg, arrays.to_torch_state_dict())
    out = _test_metrics(screener, cfg, federation, float(test["threshold"]))
    out.update(auc_hist=float(test["auc"]), auc_site_mean=float(test["auc_site_mean"]),
               selected_round=float(test["selected_round"]))
    return out


def _pooled(cfg) -> dict[str, float]:
    import torch
    from torch.utils.data import ConcatDataset

    from client.trainer import build_screener, make_loader, train_local
    from shared.metrics import choose_threshold, histogram_auc, histograms_of, score_histograms
    from simulation.evaluation import load_federation

    federation = load_federation(cfg)
    train = ConcatDataset([d["train"] for _, _, d in federation])
    torch.manual_seed(cfg.seed)
    screener = build_screener(cfg)
    best = (-math.inf, 0, None, 0.5)
    for rnd in range(1, cfg.rounds + 1):  # a "round" = local_epochs epochs, validated like the federation
        loader = make_loader(train, cfg.federation.batch_size, shuffle=True, seed=cfg.seed * 1000 + rnd)
        train_local(screener, loader, cfg.federation, "cpu")
        neg, pos = histograms_of(score_histograms(*_scores(screener, [d for _, _, d in federation], "val")))
        auc = histogram_auc(neg, pos)
        if auc > best[0]:
            state = {k: v.detach().clone() for k, v in screener.state_dict().items()}
            best = (auc, rnd, state, choose_threshold(neg, pos, cfg.task.operating_point, cfg.task.target_sensitivity))
    screener.load_state_dict(best[2])
    out = _test_metrics(screener, cfg, federation, best[3])
    out["selected_round"] = float(best[1])
    return out


def _priority(job: dict) -> int:
    """The goal's runs first (federated neural models, then pooled MM-CL), the cheap ones next."""
    if job["model"] in NEURAL:
        return 0 if job["mode"] == "federated" else 1 if job["model"] == "mmcl" else 3
    return 2


def run_job(job: dict) -> dict:
    """One (mix, seed, mode, model) run in a worker process; cached in ``job['cache']``."""
    import torch

    from shared.config import compose

    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    cache = Path(job["cache"])
    if cache.is_file():
        return json.loads(cache.read_text())
    if job.get("cached_only"):
        return {}
    cfg = compose(job["overrides"] + [f"model={job['model']}"])
    start = time.perf_counter()
    if job["mode"] == "federated":
        metrics = _federated(cfg, Path(job["run_dir"]))
    else:
        metrics = _pooled(cfg)
    row = {k: job[k] for k in ("mix", "seed", "mode", "model")} | metrics
    row["lr"] = cfg.federation.lr
    row["seconds"] = round(time.perf_counter() - start, 1)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(row))
    print(f"  {row['mix']} seed {row['seed']} {row['mode']:9s} {row['model']:13s} AUC {row['auc']:.3f} "
          f"(oracle {row['oracle_auc']:.3f}) {row['seconds']:.0f} s", flush=True)
    return row


def _mean_sd(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def summarise(rows: list[dict], mixes: list[str]) -> dict:
    """Mean and SD over seeds per mix, and over every (mix, seed) together; the goal check."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        for mix in (r["mix"], "all"):
            groups.setdefault((mix, r["mode"], r["model"]), []).append(r)
    table = {}
    for (mix, mode, model), rs in groups.items():
        entry = {"n_runs": len(rs)}
        for key in (*METRICS, "oracle_auc", "auc_hist", "threshold", "seconds", "lr"):
            vals = [r[key] for r in rs if key in r and r[key] is not None]
            if vals:
                entry[key] = _mean_sd(vals)
        table[f"{mix}/{mode}/{model}"] = entry
    goal = {}
    for mix in [*mixes, "all"]:
        mm = table.get(f"{mix}/federated/mmcl")
        others = {m: table[f"{mix}/federated/{m}"]["auc"][0] for m in MODELS[1:] if f"{mix}/federated/{m}" in table}
        if mm and others:
            best = max(others, key=others.get)
            margin = mm["auc"][0] - others[best]
            goal[mix] = {"mmcl": mm["auc"][0], "best_ablation": best, "best_ablation_auc": others[best],
                         "margin": margin, "met": margin >= 0.02}
    return {"table": table, "goal": goal}


def markdown(summary: dict, mixes: list[str]) -> str:
    lines = ["| mix | training | model | AUC | ACC | F1 | SEN | SPC | PRE | threshold | oracle AUC | s/run |",
             "|---" * 12 + "|"]
    for mix in [*mixes, "all"]:
        for mode in ("federated", "pooled"):
            for model in MODELS:
                e = summary["table"].get(f"{mix}/{mode}/{model}")
                if not e:
                    continue
                cells = [f"{e[k][0]:.3f} ± {e[k][1]:.3f}" for k in METRICS]
                lines.append(f"| {mix} | {mode} | {model} | " + " | ".join(cells)
                             + f" | {e['threshold'][0]:.2f} | {e['oracle_auc'][0]:.3f} | {e['seconds'][0]:.0f} |")
    lines.append("")
    for mix, g in summary["goal"].items():
        lines.append(f"- {mix}: federated MM-CL {g['mmcl']:.3f} vs best ablation {g['best_ablation']} "
                     f"{g['best_ablation_auc']:.3f}: margin {g['margin']:+.3f} (goal +0.020: {'met' if g['met'] else 'not met'})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--mixes", default="balanced:1.0:1.0,image:1.5:0.7", help="name:image_signal:clinical_signal,...")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--modes", default="federated,pooled")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="runs/bench-quality")
    ap.add_argument("--summarise-only", action="store_true", help="tabulate the runs already cached, start none")
    ap.add_argument("--reverse", action="store_true", help="run the queue from its end (a second bench process beside a first)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    mixes = [m.split(":") for m in args.mixes.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    # small sites (450 patients): the whole grid fits a shared 2-core machine in under an hour
    base = ["num_sites=5", "synth.patients_per_site=[110,90,70,100,80]", "rounds=5", "federation.local_epochs=2",
            *args.overrides]
    from shared.config import compose
    from simulation.synth import write_federation

    jobs = []
    for name, image_signal, clinical_signal in mixes:
        for seed in seeds:
            root = out / "data" / f"{name}_s{seed}"
            over = base + [f"seed={seed}", f"data_root={root}", f"synth.image_signal={image_signal}",
                           f"synth.clinical_signal={clinical_signal}"]
            if not (root / "oracle.csv").is_file() and not args.summarise_only:
                write_federation(compose(over))
            for mode in args.modes.split(","):
                for model in args.models.split(","):
                    key = f"{name}_s{seed}_{mode}_{model}"
                    jobs.append({"mix": name, "seed": seed, "mode": mode, "model": model, "overrides": over,
                                 "cached_only": args.summarise_only,
                                 "cache": str(out / "jobs" / f"{key}.json"), "run_dir": str(out / "runs" / key)})
    jobs.sort(key=lambda j: (_priority(j), j["seed"], j["mix"]))
    if args.reverse:
        jobs.reverse()
    print(f"bench_quality: {len(jobs)} runs ({len(mixes)} mixes x {len(seeds)} seeds) on {args.workers} workers -> {out}")
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        rows = [r for r in pool.map(run_job, jobs) if r]
    summary = summarise(rows, [m[0] for m in mixes])
    RESULTS.mkdir(exist_ok=True)
    result = {"overrides": base, "mixes": mixes, "seeds": seeds, "rows": rows, **summary,
              "wall_seconds": round(time.perf_counter() - start)}
    (RESULTS / "quality.json").write_text(json.dumps(result, indent=2))
    print(markdown(summary, [m[0] for m in mixes]))


if __name__ == "__main__":
    main()
