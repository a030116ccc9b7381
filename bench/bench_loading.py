"""Loading throughput: cold (decode DICOM) vs warm (site cache) vs what MM-CL training consumes.

The issue's goal: a warm loader at least 3x faster than the training step consumes images, so
data never waits on DICOM decoding after the first round. Measured on one synthetic site
(simulation.synth), stored uncompressed and re-encoded as JPEG 2000 lossless (a common PACS
export and the costliest decoder we ship). Prints a table and writes bench/results/bench_loading.json.

    python bench/bench_loading.py [--patients 150] [--steps 20] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import pydicom
import torch
from pydicom.uid import JPEG2000Lossless
from rich.console import Console
from rich.table import Table

from shared.cache import CACHE_DIRNAME
from shared.config import FedmskConfig, compose
from shared.sitedata import image_files, load_site, make_datasets

RESULTS = Path(__file__).resolve().parent / "results"


def _reencode(src: Path, dst: Path) -> Path:
    """A copy of the site with every image re-encoded as JPEG 2000 lossless."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(CACHE_DIRNAME))
    for path in image_files(dst):
        ds = pydicom.dcmread(path)
        ds.compress(JPEG2000Lossless)
        ds.save_as(path)
    return dst


def _timed_load(site_dir: Path, cfg: FedmskConfig) -> tuple[float, int]:
    start = time.perf_counter()
    site = load_site(site_dir, cfg.task)
    return time.perf_counter() - start, len(site.headers)


def loading_rates(site_dir: Path, cfg: FedmskConfig, repeats: int) -> dict[str, float]:
    """images/s for load_site with an empty cache (decode) and with a filled one (best of ``repeats``)."""
    shutil.rmtree(site_dir / CACHE_DIRNAME, ignore_errors=True)
    cold_s, files = _timed_load(site_dir, cfg)
    warm_s = min(_timed_load(site_dir, cfg)[0] for _ in range(repeats))
    return {"files": files, "cold_s": cold_s, "warm_s": warm_s, "cold_img_s": files / cold_s, "warm_img_s": files / warm_s}


def epoch_rate(site_dir: Path, cfg: FedmskConfig) -> float:
    """images/s of one augmented training epoch from the in-memory dataset (what every round re-runs)."""
    train = make_datasets(load_site(site_dir, cfg.task), cfg.task, cfg.seed)["train"]
    loader = torch.utils.data.DataLoader(train, batch_size=cfg.federation.batch_size, shuffle=True)
    start = time.perf_counter()
    seen = sum(int(batch["label"].shape[0]) for batch in loader)
    return seen / (time.perf_counter() - start)


def training_rate(site_dir: Path, cfg: FedmskConfig, steps: int) -> float | None:
    """images/s of MM-CL forward + backward + Adam step (None when shared.models is absent)."""
    try:
        from shared.losses import build_criterion
        from shared.models import build_model
    except ImportError:
        return None
    train = make_datasets(load_site(site_dir, cfg.task), cfg.task, cfg.seed)["train"]
    loader = torch.utils.data.DataLoader(train, batch_size=cfg.federation.batch_size, shuffle=True, drop_last=True)
    batches = [next(iter(loader)) for _ in range(3)]
    model, criterion = build_model(cfg), build_criterion(cfg)
    optimizer = torch.optim.Adam(list(model.parameters()) + list(criterion.parameters()), lr=cfg.federation.lr)
    model.train()

    def step(batch: dict[str, torch.Tensor]) -> None:
        loss, _ = criterion(model(batch["image"], batch["clinical"]), batch["label"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for batch in batches[:2]:  # warm-up (allocator, autograd graph)
        step(batch)
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    return steps * cfg.federation.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=150)
    parser.add_argument("--steps", type=int, default=20, help="timed MM-CL training steps")
    parser.add_argument("--repeats", type=int, default=3, help="warm loads; the best is reported")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from simulation.synth import write_federation

    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose([f"data_root={tmp}/fed", "num_sites=1", f"synth.patients_per_site=[{args.patients}]", *args.overrides])
        torch.set_num_threads(cfg.federation.torch_threads)  # as a simulated site runs (2 threads oversubscribe here)
        root = write_federation(cfg)
        site = sorted(p.parent for p in root.glob("*/clinical.csv"))[0]
        j2k = _reencode(site, Path(tmp) / "site_j2k")
        rows = {"explicit_vr_le": loading_rates(site, cfg, args.repeats), "jpeg2000_lossless": loading_rates(j2k, cfg, args.repeats)}
        epoch = epoch_rate(site, cfg)
        train = training_rate(site, cfg, args.steps)

    table = Table(title=f"loading vs MM-CL training, {args.patients} patients, input {cfg.task.image_size}, "
                        f"{torch.get_num_threads()} torch threads")
    for col in ("stored as", "files", "cold img/s", "warm img/s", "warm/cold", "warm / training"):
        table.add_column(col, justify="right")
    for name, r in rows.items():
        table.add_row(name, str(r["files"]), f"{r['cold_img_s']:.0f}", f"{r['warm_img_s']:.0f}",
                      f"{r['warm_img_s'] / r['cold_img_s']:.1f}x", f"{r['warm_img_s'] / train:.1f}x" if train else "n/a")
    console.print(table)
    console.print(f"augmented training epoch from memory: {epoch:.0f} img/s")
    console.print(f"MM-CL training step (batch {cfg.federation.batch_size}): "
                  + (f"{train:.0f} img/s" if train else "shared.models not available"))
    result = {
        "bench": "loading", "patients": args.patients, "image_size": cfg.task.image_size, "batch_size": cfg.federation.batch_size,
        "torch_threads": torch.get_num_threads(), "machine": platform.platform(), "loading": rows,
        "epoch_img_s": epoch, "training_img_s": train,
        "warm_over_training": {k: r["warm_img_s"] / train for k, r in rows.items()} if train else None,
        "goal_warm_over_training": 3.0,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "bench_loading.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
