"""What the model input size costs and gains: MM-CL at 64x64 (the CPU default), 128x128 and
224x224 (the seed paper's size).

Cost: seconds per training step (forward, backward, Adam; batch ``--batch``; one torch thread
unless ``--threads``) for each size, side by side in one process, on ``--device``.
Gain (``--train``): pooled MM-CL trained on one synthetic federation at each size for the same
epochs, best validation epoch, AUC on the pooled test patients, oracle AUC beside. The
federation is written at ``synth.image_size=256`` so that no size is an upsampled copy.
Writes bench/results/image_size.json.

    python bench/bench_image_size.py [--sizes 64,128,224] [--train 64,128] [--epochs 10] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def step_seconds(size: int, batch: int, steps: int, device: str, overrides: list[str]) -> float:
    from client.trainer import build_screener, make_optimizer
    from shared.config import compose

    cfg = compose([f"task.image_size=[{size},{size}]", *overrides])
    screener = build_screener(cfg).to(device).train()
    opt = make_optimizer(screener.parameters(), cfg.federation)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(batch, 1, size, size, generator=g).to(device)
    clinical = torch.randn(batch, 5, generator=g).to(device)
    labels = (torch.arange(batch) % 2).to(device)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        loss, _ = screener.criterion(screener(image, clinical), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def trained_auc(size: int, epochs: int, data_root: Path, overrides: list[str]) -> dict[str, float]:
    from torch.utils.data import ConcatDataset

    from client.trainer import build_screener, make_loader, train_local
    from shared.config import compose
    from shared.metrics import auc_score
    from simulation.evaluation import load_federation, split_patient_ids
    from simulation.oracle import oracle_auc
    from client.trainer import predict

    cfg = compose([f"data_root={data_root}", f"task.image_size=[{size},{size}]", *overrides])
    federation = load_federation(cfg)
    train = ConcatDataset([d["train"] for _, _, d in federation])
    torch.manual_seed(cfg.seed)
    screener = build_screener(cfg)

    def scores(split: str):
        out = [predict(screener, make_loader(d[split], 64, shuffle=False, seed=0), "cpu") for _, _, d in federation]
        return np.concatenate([o[0] for o in out]), np.concatenate([o[1][:, 1] for o in out])

    best, start = (-1.0, 0.0, 0), time.perf_counter()
    for epoch in range(1, epochs + 1):
        train_local(screener, make_loader(train, cfg.federation.batch_size, shuffle=True, seed=epoch), cfg.federation, "cpu", epochs=1)
        val, test = auc_score(*scores("val")), auc_score(*scores("test"))
        if val > best[0]:
            best = (val, test, epoch)
    keys = [(f.name, pid) for f, site, _ in federation for pid in split_patient_ids(site, cfg, "test")]
    return {"val_auc": best[0], "test_auc": best[1], "epoch": best[2], "oracle_auc": oracle_auc(data_root, keys),
            "train_seconds": round(time.perf_counter() - start)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,128,224")
    ap.add_argument("--train", default="", help="sizes to train and score (e.g. 64,128); empty: cost only")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="runs/bench-image-size")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    result: dict = {"device": args.device, "threads": args.threads, "batch": args.batch, "overrides": args.overrides}
    result["step_seconds"] = {s: step_seconds(s, args.batch, args.steps, args.device, args.overrides) for s in sizes}
    base = result["step_seconds"][sizes[0]]
    for s in sizes:
        print(f"{s}x{s}: {result['step_seconds'][s] * 1000:.0f} ms/step ({result['step_seconds'][s] / base:.1f}x {sizes[0]})")
    if args.train:
        from shared.config import compose
        from simulation.synth import write_federation

        root = Path(args.out).resolve() / "sites"
        if not (root / "oracle.csv").is_file():
            write_federation(compose([f"data_root={root}", "synth.image_size=256", *args.overrides]))
        result["trained"] = {}
        for s in (int(x) for x in args.train.split(",")):
            result["trained"][s] = trained_auc(s, args.epochs, root, args.overrides)
            print(f"{s}x{s}: {result['trained'][s]}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "image_size.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
