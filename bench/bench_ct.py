"""CT (vertebral fracture task): 3D loading vs 3D training throughput, step time and memory.

Loading: ``load_site`` on one synthetic CT site with an empty cache (every slice decoded, HU
windowed, resampled, cropped) and with a filled one (the preprocessed volumes read back), per
scanner export (one file per slice; one Enhanced CT file). Training: the ``fracture3d`` model's
training step on those volumes (forward + backward + Adam, batch ``federation.batch_size``),
with and without the training augmentation, and with DP-SGD (Opacus hooks); the process' peak
RSS (CPU) or peak allocated memory (GPU). Prints a table and writes
bench/results/bench_ct.json. Side by side in one run, at ``federation.torch_threads``.

``--quality`` instead trains the 4-class model federated (SupCon aux, no aux, DP epsilon 8 with
the per-sample prototype aux) and pooled on the same synthetic federation per seed, and reports
the pooled test macro-F1, per-grade F1 and the screening output P(grade >= 1) with the oracle
beside (bench/results/bench_ct_quality.json).

    python bench/bench_ct.py [--patients 40] [--steps 10] [overrides ...]
    python bench/bench_ct.py --quality [--patients 60] [--seeds 0,1] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from shared.cache import CACHE_DIRNAME
from shared.config import FedmskConfig, compose, resolve_device
from shared.sitedata import load_site, make_datasets
from simulation.synth_ct import write_federation

RESULTS = Path(__file__).resolve().parent / "results"
CT = ["task=vertebral_fracture", "model=fracture3d"]


def loading(site_dir: Path, cfg: FedmskConfig) -> dict[str, float]:
    """Volumes/s with an empty cache (decode + preprocess) and a filled one (best of 3)."""
    shutil.rmtree(site_dir / CACHE_DIRNAME, ignore_errors=True)
    start = time.perf_counter()
    site = load_site(site_dir, cfg.task)
    cold = time.perf_counter() - start
    warm = min(_timed(lambda: load_site(site_dir, cfg.task)) for _ in range(3))
    n = len(site.labels)
    return {"volumes": n, "files": len(site.headers), "cold_s": cold, "warm_s": warm, "cold_vol_s": n / cold, "warm_vol_s": n / warm}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def training(site_dir: Path, cfg: FedmskConfig, steps: int, augment: bool, dp: bool) -> dict[str, float]:
    """Seconds per training step and volumes/s of fracture3d on this site's cached volumes."""
    from client.trainer import build_screener, make_loader, make_optimizer

    cfg.task.augment = augment
    train = make_datasets(load_site(site_dir, cfg.task), cfg.task, cfg.seed)["train"]
    device = resolve_device(cfg.device)
    screener = build_screener(cfg).to(device).train()
    optimizer = make_optimizer(list(screener.parameters()), cfg.federation)
    module = screener
    if dp:
        from opacus import GradSampleModule

        module = GradSampleModule(screener)
    loader = make_loader(train, cfg.federation.batch_size, shuffle=True, seed=0)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    done, seen, elapsed = 0, 0, 0.0
    while done < steps + 2:
        for batch in loader:
            start = time.perf_counter()
            image, clinical, label = (batch[k].to(device) for k in ("image", "clinical", "label"))
            loss, _ = screener.criterion(module(image, clinical), label)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if dp:  # per-sample clipping's cost is in the backward hooks; the step itself is plain Adam
                for p in screener.parameters():
                    p.grad_sample = None
            optimizer.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if done >= 2:  # the first steps build the conv3d kernels: not part of the rate
                elapsed += time.perf_counter() - start
                seen += label.shape[0]
            done += 1
            if done >= steps + 2:
                break
    # GPU: peak allocated by this mode; CPU: the process' peak RSS so far (a high-water mark: the
    # modes run in order of cost, so each figure bounds that mode from above)
    memory = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"step_s": elapsed / steps, "vol_s": seen / elapsed, "memory_mib": memory, "device": device}


# --quality: the README's results table (the 4-class model; its screening output is P(grade >= 1))
RUNS = {
    "federated, SupCon aux": ["model.aux_loss=supcon", "model.aux_weight=0.3"],
    "federated, no aux": ["model.aux_loss=none", "model.aux_weight=0.0"],
    "pooled, SupCon aux": ["model.aux_loss=supcon", "model.aux_weight=0.3"],
    "federated, DP eps 8 (prototype aux)": ["privacy=eps8"],
}
REPORTED = ("f1", "f1_class0", "f1_class1", "f1_class2", "f1_class3", "screen_auc", "screen_sen", "screen_spc", "oracle_f1", "oracle_auc")


def quality(args: argparse.Namespace) -> None:
    """Each RUNS entry on the same synthetic federation per seed; pooled test metrics with the oracle."""
    import os

    import numpy as np

    from server.federation import run_federation
    from simulation.central import central
    from simulation.evaluation import load_federation, load_screener, pooled_test_metrics
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ helpers live beside bench/
    from tests.inprocess_grid import InProcessGrid  # the real ClientApp, in this process (no Ray start-up)

    os.environ.setdefault("FEDMSK_INSECURE_DP_SEED", "bench-ct")  # repeatable site randomness: a benchmark
    results: dict[str, list[dict[str, float]]] = {name: [] for name in RUNS}
    seconds: dict[str, list[float]] = {name: [] for name in RUNS}
    for seed in args.seeds:
        work = Path(tempfile.mkdtemp(prefix=f"fedmsk-quality-ct-{seed}-"))
        base = CT + [f"seed={seed}", f"data_root={work / 'fed'}", "num_sites=3", f"synth.patients_per_site=[{args.patients}]",
                     "synth.image_size=64", *args.overrides]
        write_federation(compose(base))
        for k, (name, extra) in enumerate(RUNS.items()):
            cfg = compose(base + extra + [f"run_dir={work / 'runs' / f'run{k}'}"])  # one run folder per training
            torch.set_num_threads(max(1, cfg.federation.torch_threads))
            start = time.perf_counter()
            if name.startswith("pooled"):
                metrics = central(cfg, Console(quiet=True))["pooled_test"]
            else:
                arrays, _ = run_federation(InProcessGrid({100 + i: {"partition-id": i} for i in range(3)}), cfg,
                                           Path(cfg.run_dir))
                metrics = pooled_test_metrics(load_screener(cfg, arrays.to_torch_state_dict()), cfg, load_federation(cfg))
            seconds[name].append(time.perf_counter() - start)
            results[name].append({k: float(metrics[k]) for k in REPORTED if metrics.get(k) is not None} | {"n": metrics["n"]})
            print(name, seed, {k: round(v, 3) for k, v in results[name][-1].items()})
        shutil.rmtree(work, ignore_errors=True)
    summary = {name: {k: {"mean": float(np.mean([r[k] for r in rows])), "sd": float(np.std([r[k] for r in rows]))}
                      for k in rows[0]} | {"seconds": float(np.mean(seconds[name]))} for name, rows in results.items()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_ct_quality.json").write_text(json.dumps({"seeds": args.seeds, "patients_per_site": args.patients,
                                                               "overrides": args.overrides, "runs": results, "summary": summary}, indent=1))
    table = Table(title=f"vertebral fracture, 3 sites x {args.patients} patients, seeds {args.seeds} (mean +- sd, pooled test)")
    for col in ("training", "macro-F1", "F1 g0/g1/g2/g3", "screen AUC", "SEN", "SPC", "oracle F1", "oracle AUC", "s"):
        table.add_column(col)
    ms = lambda row, k: f"{row[k]['mean']:.2f} +- {row[k]['sd']:.2f}" if k in row else "-"  # noqa: E731
    for name, row in summary.items():
        table.add_row(name, ms(row, "f1"), "/".join(f"{row[f'f1_class{g}']['mean']:.2f}" for g in range(4)), ms(row, "screen_auc"),
                      ms(row, "screen_sen"), ms(row, "screen_spc"), ms(row, "oracle_f1"), ms(row, "oracle_auc"), f"{row['seconds']:.0f}")
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quality", action="store_true", help="the results table instead of the throughput figures")
    parser.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1], help="e.g. 0,1")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.quality:
        quality(args)
        return
    work = Path(tempfile.mkdtemp(prefix="fedmsk-bench-ct-"))
    cfg = compose(CT + [f"data_root={work / 'fed'}", "num_sites=3", f"synth.patients_per_site=[{args.patients}]",
                        "synth.image_size=64", *args.overrides])
    torch.set_num_threads(max(1, cfg.federation.torch_threads))
    write_federation(cfg)
    out: dict = {"config": {"patients": args.patients, "image_size": cfg.task.image_size, "spacing_mm": cfg.task.spacing_mm,
                            "batch_size": cfg.federation.batch_size, "torch_threads": cfg.federation.torch_threads,
                            "model": f"{cfg.model.name} width {cfg.model.width} stages {cfg.model.stages}"},
                 "machine": platform.processor() or platform.machine(), "loading": {}, "training": {}}
    for site, label in (("site_a", "one file per slice (2 mm, 64x64)"), ("site_c", "Enhanced CT, one file (2.5 mm)")):
        out["loading"][label] = loading(work / "fed" / site, cfg)
    for name, augment, dp in (("plain", False, False), ("augmented", True, False), ("DP-SGD hooks", False, True)):
        out["training"][name] = training(work / "fed" / "site_a", compose(CT + [f"data_root={work / 'fed'}", *args.overrides]),
                                         args.steps, augment, dp)
    shutil.rmtree(work, ignore_errors=True)

    console = Console()
    table = Table(title=f"3D loading vs training ({cfg.task.image_size} voxels, {cfg.federation.torch_threads} thread)")
    for col in ("what", "cold vol/s", "warm vol/s", "step s", "train vol/s", "memory MiB"):
        table.add_column(col)
    for label, r in out["loading"].items():
        table.add_row(f"load: {label}", f"{r['cold_vol_s']:.1f}", f"{r['warm_vol_s']:.1f}", "", "", "")
    for label, r in out["training"].items():
        table.add_row(f"train: {label} ({r['device']})", "", "", f"{r['step_s']:.3f}", f"{r['vol_s']:.1f}", f"{r['memory_mib']:.0f}")
    console.print(table)
    plain = out["training"]["plain"]["vol_s"]
    for label, r in out["loading"].items():
        out["loading"][label]["warm_over_training"] = r["warm_vol_s"] / plain
        console.print(f"{label}: warm loading {r['warm_vol_s'] / plain:.1f}x, cold {r['cold_vol_s'] / plain:.2f}x the plain training rate")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_ct.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
