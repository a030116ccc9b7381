"""MM-CL's local training step on a GPU: step time and images/s, fp32 vs bf16 (vs fp16), DP-SGD vs plain.

Each cell is ``client.trainer.train_local`` (the loop every site runs, with federation.precision's
autocast, shared.precision) over random patients on ``--device``, one warm-up epoch, then
``--epochs`` timed epochs (``torch.cuda.synchronize`` before each clock read). DP cells wrap it
with Opacus the way client.privacy does (hooks mode, Poisson sampling; noise multiplier 1, clip 1:
the step cost does not depend on their values). fp16 runs without DP only (shared.precision).

Without a GPU it prints why, writes ``{"gpu": null, "status": "no GPU ..."}`` and exits 0, so
``make bench`` passes on CPU machines; ``--device cpu`` runs the same cells on the CPU (a smoke
test of the script, not a GPU figure).

    python bench/bench_gpu.py [--batch 64] [--patients 1024] [--epochs 2] [--image-size 64] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"


class OpacusPrivacy:
    """The two calls train_local makes of client.privacy.SitePrivacy, without a site's ledger."""

    def __init__(self, device: str) -> None:
        self.device = device

    def make_private(self, module, optimizer, loader):
        from opacus import PrivacyEngine

        from client.privacy import GRAD_SAMPLE_MODE

        return PrivacyEngine().make_private(module=module, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
                                            max_grad_norm=1.0, poisson_sampling=True, grad_sample_mode=GRAD_SAMPLE_MODE)

    def detach(self, module) -> None:
        module._close()


def patients(n: int, image_size: int, n_clinical: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 1, image_size, image_size, generator=g)
    clinical = torch.randn(n, n_clinical, generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    return [{"image": images[i], "clinical": clinical[i], "label": labels[i]} for i in range(n)]


def cell(cfg, data: list[dict], device: str, precision: str, dp: bool, epochs: int) -> dict:
    from client.trainer import build_screener, make_loader, train_local

    torch.manual_seed(0)
    screener = build_screener(cfg)
    fed = replace(cfg.federation, precision=precision)

    def run(n_epochs: int):
        loader = make_loader(data, fed.batch_size, shuffle=True, seed=0)
        return train_local(screener, loader, fed, device, epochs=n_epochs, privacy=OpacusPrivacy(device) if dp else None)

    run(1)  # warm-up: kernels, autotuning, allocator
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    result = run(epochs)
    sync()
    seconds = time.perf_counter() - t0
    out = {"precision": precision, "dp": dp, "steps": result.steps, "seconds": seconds,
           "step_ms": 1000 * seconds / max(result.steps, 1), "images_per_s": len(data) * epochs / seconds}
    if device.startswith("cuda"):
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--patients", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--json", default=None, help="file name under bench/results/ (default gpu.json, cpu: gpu_cpu_smoke.json)")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    on_gpu = args.device.startswith("cuda")
    path = RESULTS / (args.json or ("gpu.json" if on_gpu else "gpu_cpu_smoke.json"))
    if on_gpu and not torch.cuda.is_available():
        status = f"no GPU: torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False); nothing measured"
        print(f"bench_gpu skipped: {status}")
        path.write_text(json.dumps({"gpu": None, "status": status, "cells": []}, indent=2))
        return
    from torch import nn

    from client.trainer import build_screener
    from shared.config import compose

    cfg = compose(["model=mmcl", f"task.image_size=[{args.image_size},{args.image_size}]", "model.aux_loss=prototype",
                   f"federation.batch_size={args.batch}", f"device={args.device}"])
    n_clinical = next(m for m in build_screener(cfg).net.clinical.modules() if isinstance(m, nn.Linear)).in_features
    data = patients(args.patients, args.image_size, n_clinical)
    gpu = torch.cuda.get_device_name(args.device) if on_gpu else None
    bf16 = not on_gpu or torch.cuda.is_bf16_supported()
    plan = [("fp32", False), ("fp32", True)] + ([("bf16", False), ("bf16", True)] if bf16 else []) + [("fp16", False)]
    cells = []
    print(f"| precision | DP-SGD | step ms | images/s |\n|---|---|---|---|", flush=True)
    for precision, dp in plan:
        c = cell(cfg, data, args.device, precision, dp, args.epochs)
        cells.append(c)
        print(f"| {precision} | {'yes' if dp else 'no'} | {c['step_ms']:.1f} | {c['images_per_s']:.0f} |", flush=True)
    path.write_text(json.dumps({"gpu": gpu, "device": args.device, "torch": torch.__version__, "batch": args.batch,
                                "patients": args.patients, "image_size": args.image_size, "cells": cells}, indent=2))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
