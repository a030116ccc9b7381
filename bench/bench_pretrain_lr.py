"""Choose DP-SGD's learning rate for federated SSL pretraining, under DP, on tuning federations.

Why (README "Label efficiency", sites with many unlabelled patients): at the DP presets' lr (0.1, SGD with
momentum 0.9, chosen for fine-tuning's few steps) a pretraining run of many more steps lets DP-SGD's noise
random-walk the weights of every convolution that a normalisation layer follows. No gradient restores their
scale, so the norms grow (4.6 -> 48.9 on the last block's convolution), and the un-normalised feature maps the
fusion reads grow 30-100,000x while the objective, which reads a normalised embedding, does not notice.
Fine-tuning then starts from saturated logits.

For each tuning seed (default 100, 101; never the label-efficiency grid's 0, 1, 2) and each lr it pretrains
``pretrain=ssl`` (``--objective crossmodal``: that preset) under the eps 4 preset with ``privacy.lr=LR``
exactly as bench/bench_pretrain.py's ``ssl`` arm does, records the largest activation of ``image.features``
on one test batch (random init: about 3), then fine-tunes under ``privacy=eps8`` at 10 % and at 100 % of the labels and scores the pooled
**validation** patients (test beside, not used). The chosen lr is the one with the best mean validation AUC
at 10 % labels (the grid's question), chosen with DP on. The same fine-tunes from random init, on the same
seeds, are the table's reference row (``random_init`` in the JSON): what pretraining has to beat.

``--batches`` adds DP-SGD's batch size to the grid (``privacy.batch_size``, the presets' 32 by default). At one
epsilon a larger batch draws a larger noise multiplier, but the noise on the *mean* gradient (sigma * C / B)
falls, and each step averages more patients' clipped gradients: more signal per step, fewer steps.

    python bench/bench_pretrain_lr.py [--lrs 0.01,0.03,0.1] [--batches 32,128] [--seeds 100,101] [--unlabelled 4]
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
import bench_pretrain_tune as bt
from shared.config import compose

RESULTS = Path(__file__).resolve().parent / "results"
PRESET_BATCH = 32  # configs/privacy/eps*.yaml's privacy.batch_size (rows written before --batches existed used it)


def feature_scale(weights: Path, sites: Path, seed: int) -> float:
    """Largest |activation| of the image encoder's feature maps on one batch of a site's test images."""
    from client.trainer import make_loader
    from shared.models import build_model
    from simulation.evaluation import load_federation

    model = build_model(compose(bp.FEDERATION + bp.MODEL + [f"model.pretrained_path={weights}"])).eval()
    seen: dict[str, float] = {}
    model.image.features.register_forward_hook(lambda mod, inp, out: seen.__setitem__("max", float(out.abs().max())))
    _, _, datasets = next(iter(load_federation(compose(bp.FEDERATION + bp.MODEL + [f"data_root={sites}", f"seed={seed}"]))))
    batch = next(iter(make_loader(datasets["test"], 64, shuffle=False, seed=0)))
    with torch.no_grad():
        model(batch["image"], batch["clinical"])
    return seen["max"]


def pretrain(out: Path, seed: int, lr: float, batch: int, objective: str = "ssl") -> tuple[Path, float]:
    from client.site import list_sites
    from simulation.pretrain_fed import run_federated_pretrain
    from tests.inprocess_grid import InProcessGrid

    work = out / (f"lr{lr:g}-seed{seed}" if batch == PRESET_BATCH else f"lr{lr:g}-b{batch}-seed{seed}")
    data = bp._fresh(bp.write_sites(out, seed), work / "data")
    cfg = compose(bp.FEDERATION + bp.MODEL + bp.PRETRAIN_ROUNDS + [f"pretrain={objective}", f"seed={seed}", f"data_root={data}",
                                                                   f"run_dir={work / 'run'}", *bp.PRETRAIN_DP, f"privacy.lr={lr}",
                                                                   f"privacy.batch_size={batch}"])
    folders = list_sites(cfg.data_root)
    start = time.perf_counter()
    weights = run_federated_pretrain(cfg, InProcessGrid({100 + i: {"partition-id": i} for i in range(len(folders))}),
                                     Console(quiet=True))
    return weights, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lrs", default="0.01,0.03,0.1")
    ap.add_argument("--batches", default=str(PRESET_BATCH),
                    help="DP-SGD batch sizes for pretraining (the same epsilon: a larger batch gets more noise per step, "
                         "less per patient)")
    ap.add_argument("--seeds", default="100,101")
    ap.add_argument("--objective", default="ssl", choices=["ssl", "crossmodal"], help="the pretraining preset (pretrain=...)")
    ap.add_argument("--unlabelled", type=int, default=4, metavar="K", help="bench_pretrain.py --unlabelled (0: none)")
    ap.add_argument("--json", default=None, help="default bench/results/bench_pretrain_lr[_unlabelled-K].json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    console = Console()
    seeds = [int(s) for s in args.seeds.split(",")]
    if bt.GRID_SEEDS & set(seeds):
        raise SystemExit(f"--seeds {args.seeds}: seeds {sorted(bt.GRID_SEEDS)} are the label-efficiency grid's; tune elsewhere")
    stem = ("bench_pretrain_lr" + ("" if args.objective == "ssl" else f"_{args.objective}")
            + (bp.set_unlabelled(args.unlabelled) if args.unlabelled else ""))
    path = Path(args.json or RESULTS / f"{stem}.json")
    report = json.loads(path.read_text()) if path.exists() else {}
    runs = report.setdefault("runs", [])
    report.update(machine={"platform": platform.platform(), "torch": torch.__version__, "threads": 1},
                  federation=bp.FEDERATION + bp.MODEL, unlabelled_per_labelled=args.unlabelled,
                  protocol=f"pretrain={args.objective} under {bp.PRETRAIN_DP[0]} with privacy.lr=LR; fine-tune model.finetune=all under "
                           "privacy=eps8 at 10 % and 100 % labels; chosen by pooled val AUC at 10 %")
    out = Path(f"runs/{stem}").resolve()
    for r in runs:
        r.setdefault("batch", PRESET_BATCH)
    reference = report.setdefault("random_init", [])  # the same fine-tunes with no pretraining: what to beat
    for seed in seeds:
        if not any(r["seed"] == seed for r in reference):
            row = {"seed": seed}
            for fraction in (0.1, 1.0):
                bt.FRACTION = fraction
                res = bt.finetune(out, seed, None, 8.0)
                row[f"val_auc_{fraction:g}"], row[f"test_auc_{fraction:g}"] = res["val_auc"], res["test_auc"]
            reference.append(row)
            path.write_text(json.dumps(report, indent=1))
    arms = [(float(lr), int(b)) for b in args.batches.split(",") for lr in args.lrs.split(",")]
    for seed in seeds:
        for lr, batch in arms:
            if any((r["lr"], r["batch"], r["seed"]) == (lr, batch, seed) for r in runs):
                continue
            weights, seconds = pretrain(out, seed, lr, batch, args.objective)
            row = {"lr": lr, "batch": batch, "seed": seed, "pretrain_seconds": seconds,
                   "feature_max": feature_scale(weights, bp.write_sites(out, seed), seed)}
            for fraction in (0.1, 1.0):
                bt.FRACTION = fraction
                res = bt.finetune(out, seed, weights, 8.0)
                row[f"val_auc_{fraction:g}"], row[f"test_auc_{fraction:g}"] = res["val_auc"], res["test_auc"]
            runs.append(row)
            path.write_text(json.dumps(report, indent=1))
            console.print(f"  lr {lr:g} batch {batch} seed {seed}: feature max {row['feature_max']:.1f}; val AUC 10 % {row['val_auc_0.1']:.3f}, "
                          f"100 % {row['val_auc_1']:.3f}")
    lines = ["| DP pretraining lr | batch | largest feature activation | val AUC, 10 % labels | val AUC, 100 % labels | seeds |",
             "|---|---|---|---|---|---|"]
    by_arm: dict[tuple[float, int], list[dict]] = {}
    for r in runs:
        by_arm.setdefault((r["lr"], r["batch"]), []).append(r)
    # only arms run on every seed asked for compete (a half-run arm's mean is over other seeds)
    complete = [a for a, rs in by_arm.items() if {r["seed"] for r in rs} >= set(seeds)] or list(by_arm)
    best = max(complete, key=lambda a: np.mean([r["val_auc_0.1"] for r in by_arm[a]]))
    ref = [r for r in reference if r["seed"] in seeds]
    if ref:
        cell = lambda key: f"{np.mean([r[key] for r in ref]):.3f} ± {bt._sd([r[key] for r in ref]):.3f}"  # noqa: E731
        lines.append(f"| random init (no pretraining) | - | - | {cell('val_auc_0.1')} | {cell('val_auc_1')} | "
                     f"{','.join(str(r['seed']) for r in ref)} |")
    for lr, batch in sorted(by_arm, key=lambda a: (a[1], a[0])):
        rs = by_arm[(lr, batch)]
        cell = lambda key: f"{np.mean([r[key] for r in rs]):.3f} ± {bt._sd([r[key] for r in rs]):.3f}"  # noqa: E731
        scales = ", ".join(f"{r['feature_max']:.1f}" for r in rs)
        lines.append(f"| {lr:g}{' **chosen**' if (lr, batch) == best else ''} | {batch} | {scales} | "
                     f"{cell('val_auc_0.1')} | {cell('val_auc_1')} | {','.join(str(r['seed']) for r in rs)} |")
    report["chosen"], report["table"] = {"lr": best[0], "batch": best[1]}, "\n".join(lines)
    path.write_text(json.dumps(report, indent=1))
    console.print(report["table"])
    console.print(f"chosen lr {best[0]:g}, batch {best[1]}; wrote {path}")


if __name__ == "__main__":
    main()
