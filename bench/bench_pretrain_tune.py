"""Choose ``pretrain.public_variance`` (the VICReg variance term on the public bank's embeddings, issue 14) on
tuning federations, by validation AUC, separately without DP and under DP.

The label-efficiency grid (bench/bench_pretrain.py) uses synth seeds 0, 1, 2; this script never reads
them. For each tuning seed (default 100, 101: other synthetic federations of the same shape), each DP
setting and each weight W it pretrains with ``pretrain=ssl pretrain.public_variance=W`` exactly as the grid's
``ssl`` arm does (3 rounds; under DP the eps 4 preset with ``pretrain.epsilon`` 2.0), then fine-tunes the
whole model with 10 % of each site's labels (the grid's cell; under DP ``privacy=eps8``), and scores the
pooled **validation** patients (exact AUC). The chosen weight per DP setting is the one with the highest
mean validation AUC over the tuning seeds; hyperparameters used under DP are chosen with DP on. The
tuning federations' test AUC is recorded beside it but not used.

    python bench/bench_pretrain_tune.py [--weights 0,0.03,0.1,0.3,1] [--epsilons none,8] [--seeds 100,101]
        [--json bench/results/bench_pretrain_tune.json] [--out runs/bench_pretrain_tune] [--unlabelled K]

Each finished run is appended to the JSON at once; a rerun skips what is there (two processes may run
disjoint --epsilons into different --json files; --merge A,B joins them and re-renders the table).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from rich.console import Console

import bench_pretrain as bp
from shared.config import compose

RESULTS = Path(__file__).resolve().parent / "results"
GRID_SEEDS = {0, 1, 2}
FRACTION = 0.1


def pooled_auc(screener, cfg, federation, split: str) -> float:
    from client.trainer import make_loader, predict
    from shared.metrics import classification_metrics

    ys, ps = [], []
    for _, _, datasets in federation:
        y, p, _ = predict(screener, make_loader(datasets[split], 64, shuffle=False, seed=0), "cpu")
        ys.append(y)
        ps.append(p)
    return float(classification_metrics(np.concatenate(ys), np.concatenate(ps))["auc"])


def pretrain(out: Path, seed: int, weight: float, dp: bool) -> tuple[Path, float, float]:
    from client.site import list_sites
    from simulation.pretrain_fed import run_federated_pretrain
    from tests.inprocess_grid import InProcessGrid

    work = out / f"w{weight:g}-seed{seed}-{'dp' if dp else 'nodp'}"
    data = bp._fresh(bp.write_sites(out, seed), work / "data")
    cfg = compose(bp.FEDERATION + bp.MODEL + bp.PRETRAIN_ROUNDS + ["pretrain=ssl", f"pretrain.public_variance={weight}",
                                                                   f"seed={seed}", f"data_root={data}", f"run_dir={work / 'run'}",
                                                                   *(bp.PRETRAIN_DP if dp else [])])
    folders = list_sites(cfg.data_root)
    start = time.perf_counter()
    weights = run_federated_pretrain(cfg, InProcessGrid({100 + i: {"partition-id": i} for i in range(len(folders))}),
                                     Console(quiet=True))
    eps = bp._epsilon_max(folders, cfg.privacy.delta, cfg.privacy.accountant) if dp else 0.0
    return weights, eps, time.perf_counter() - start


def finetune(out: Path, seed: int, weights: Path | None, eps: float | None) -> dict:
    """Fine-tune from ``weights`` (None: random init) at ``FRACTION`` of the labels; pooled val and test AUC."""
    from client.site import list_sites
    from server.federation import run_federation
    from simulation.evaluation import load_federation, load_screener
    from tests.inprocess_grid import InProcessGrid

    work = out / "cell"
    data = bp._fresh(bp.write_sites(out, seed), work)
    cfg = compose(bp.FEDERATION + bp.MODEL + [f"seed={seed}", f"task.label_fraction={FRACTION}", "model.finetune=all",
                                              *bp.PRESETS[eps], *([f"model.pretrained_path={weights}"] if weights else []),
                                              f"data_root={data}", f"run_dir={work / 'run'}"])
    folders = list_sites(cfg.data_root)
    start = time.perf_counter()
    arrays, _ = run_federation(InProcessGrid({100 + i: {"partition-id": i} for i in range(len(folders))}), cfg, work / "run")
    screener = load_screener(cfg, arrays.to_torch_state_dict())
    fed = load_federation(cfg, folders)
    return {"val_auc": pooled_auc(screener, cfg, fed, "val"), "test_auc": pooled_auc(screener, cfg, fed, "test"),
            "epsilon_max": bp._epsilon_max(folders, cfg.privacy.delta, cfg.privacy.accountant),
            "finetune_seconds": time.perf_counter() - start}


def _sd(a: list[float]) -> float:
    return float(np.std(a, ddof=1)) if len(a) > 1 else 0.0


def summarise(runs: list[dict]) -> tuple[dict, str]:
    """Per DP setting: mean ± SD validation AUC per weight, the argmax; a README table."""
    chosen, lines = {}, ["| DP | public_variance | val AUC (10 % labels, fine-tuned) | test AUC (not used) | seeds |",
                         "|---|---|---|---|---|"]
    for eps in sorted({r["epsilon"] for r in runs}, key=lambda e: (e is not None, e or 0)):
        by_w: dict[float, list[dict]] = {}
        for r in runs:
            if r["epsilon"] == eps:
                by_w.setdefault(r["weight"], []).append(r)
        n_max = max(len(v) for v in by_w.values())
        full = {w: v for w, v in by_w.items() if len(v) == n_max}  # choose among weights run on every tuning seed
        best = max(full, key=lambda w: np.mean([r["val_auc"] for r in full[w]]))
        chosen["none" if eps is None else f"{eps:g}"] = best
        for w in sorted(by_w):
            v = [r["val_auc"] for r in by_w[w]]
            t = [r["test_auc"] for r in by_w[w]]
            mark = " **chosen**" if w == best else ""
            lines.append(f"| {'no DP' if eps is None else f'eps {eps:g}'} | {w:g}{mark} | {np.mean(v):.3f} ± {_sd(v):.3f} | "
                         f"{np.mean(t):.3f} ± {_sd(t):.3f} | {','.join(str(r['seed']) for r in by_w[w])} |")
    return chosen, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="0,0.03,0.1,0.3,1")
    ap.add_argument("--epsilons", default="none,8")
    ap.add_argument("--seeds", default="100,101")
    ap.add_argument("--out", default=None, help="default runs/<json stem>")
    ap.add_argument("--json", default=None, help="default bench/results/bench_pretrain_tune[_unlabelled-K].json")
    ap.add_argument("--unlabelled", type=int, default=0, metavar="K",
                    help="sites hold K unlabelled patients per labelled one (bench_pretrain.py --unlabelled)")
    ap.add_argument("--merge", default="", help="comma-separated JSON files whose runs join --json's")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    console = Console()
    seeds = [int(s) for s in args.seeds.split(",")]
    if GRID_SEEDS & set(seeds):
        raise SystemExit(f"--seeds {args.seeds}: seeds {sorted(GRID_SEEDS)} are the label-efficiency grid's; tune elsewhere")
    stem = "bench_pretrain_tune" + (bp.set_unlabelled(args.unlabelled) if args.unlabelled else "")
    path = Path(args.json or RESULTS / f"{stem}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    report = json.loads(path.read_text()) if path.exists() else {}
    runs = report.setdefault("runs", [])
    for other in filter(None, args.merge.split(",")):
        have = {(r["weight"], r["epsilon"], r["seed"]) for r in runs}
        runs += [r for r in json.loads(Path(other).read_text())["runs"] if (r["weight"], r["epsilon"], r["seed"]) not in have]
    report["machine"] = {"platform": platform.platform(), "torch": torch.__version__, "threads": 1}
    report["federation"] = bp.FEDERATION + bp.MODEL
    if args.unlabelled:
        report["unlabelled_per_labelled"] = args.unlabelled
    report["protocol"] = (f"pretrain=ssl public_variance=W ({bp.PRETRAIN_ROUNDS[0]}; DP: {bp.PRETRAIN_DP[0]}), then fine-tune "
                          f"model.finetune=all at task.label_fraction={FRACTION} (DP: privacy=eps8); chosen by pooled val AUC")
    out = Path(args.out or f"runs/{stem}").resolve()
    if not args.merge:
        for eps in [None if e == "none" else float(e) for e in args.epsilons.split(",")]:
            for seed in seeds:
                for w in [float(x) for x in args.weights.split(",")]:
                    if any((r["weight"], r["epsilon"], r["seed"]) == (w, eps, seed) for r in runs):
                        continue
                    weights, pre_eps, pre_s = pretrain(out, seed, w, eps is not None)
                    res = finetune(out, seed, weights, eps)
                    runs.append({"weight": w, "epsilon": eps, "seed": seed, "pretrain_epsilon_max": pre_eps,
                                 "pretrain_seconds": pre_s, **res})
                    path.write_text(json.dumps(report, indent=1))
                    console.print(f"  W {w:g} eps {eps} seed {seed}: val AUC {res['val_auc']:.3f} (test {res['test_auc']:.3f}; "
                                  f"{pre_s:.0f} + {res['finetune_seconds']:.0f} s)")
    if runs:
        report["chosen"], report["table"] = summarise(runs)
        console.print(report["table"])
        console.print(f"chosen: {report['chosen']}")
    path.write_text(json.dumps(report, indent=1))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
