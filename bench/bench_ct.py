"""CT (vertebral fracture task): 3D loading vs 3D training throughput, step time and memory.

Loading: ``load_site`` on one synthetic CT site with an empty cache (every slice decoded, HU
windowed, resampled, cropped) and with a filled one (the preprocessed volumes read back), per
scanner export (one file per slice; one Enhanced CT file). Training: the ``fracture3d`` model's
training step on those volumes (forward + backward + Adam, batch ``federation.batch_size``),
with and without the training augmentation, and with DP-SGD (Opacus hooks); peak RSS growth
during training (CPU) or peak allocated memory (GPU). Prints a table and writes
bench/results/bench_ct.json. Side by side in one run, at ``federation.torch_threads``.

    python bench/bench_ct.py [--patients 40] [--steps 10] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
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
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
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
    memory = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
              else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024)
    return {"step_s": elapsed / steps, "vol_s": seen / elapsed, "memory_mib": memory, "device": device}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
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
