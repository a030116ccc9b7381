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


def multiframe_peaks(folder: Path, frames: tuple[int, ...], size: int = 256) -> dict[str, dict[str, float]]:
    """Peak traced memory (MB) of `fedmsk check`'s load of one colour cine of each frame count.

    Beside it, decoding every frame of the same file (what intake did before it decoded only the
    frame a 2D task keeps). tracemalloc sees numpy and pydicom buffers, not torch's allocator.
    """
    import tracemalloc

    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    from shared.dicom import read_image

    out: dict[str, dict[str, float]] = {}
    for n in frames:
        site = folder / f"cine{n}"
        (site / "images").mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(n)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID, ds.Modality, ds.NumberOfFrames, ds.Rows, ds.Columns = "c1", "XA", n, size, size
        ds.SamplesPerPixel, ds.PlanarConfiguration, ds.PhotometricInterpretation = 3, 0, "RGB"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8).tobytes()
        ds.save_as(site / "images" / "cine.dcm", enforce_file_format=True)
        (site / "clinical.csv").write_text("patient_id,age,sex,height_cm,weight_kg,bmi,grip_strength_kg,gait_speed_m_s,"
                                           "sarcopenia\nc1,70,F,165,70,25.7,28,1.0,0\n")
        task = compose([]).task
        load_site(site, task, use_cache=False)
        peaks = {}
        for name, work in (("check", lambda: load_site(site, task, use_cache=False, verify_all=True)),
                           ("decode_all_frames", lambda: read_image(site / "images" / "cine.dcm"))):
            tracemalloc.start()
            work()
            peaks[name] = tracemalloc.get_traced_memory()[1] / 1e6
            tracemalloc.stop()
        out[str(n)] = {"file_mb": (site / "images" / "cine.dcm").stat().st_size / 1e6, **peaks}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=150)
    parser.add_argument("--steps", type=int, default=20, help="timed MM-CL training steps")
    parser.add_argument("--repeats", type=int, default=3, help="warm loads; the best is reported")
    parser.add_argument("--cine-frames", type=int, nargs="*", default=[2, 120],
                        help="frame counts of the 256x256 colour cine whose check peak memory is measured")
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
        cine = multiframe_peaks(Path(tmp) / "cine", tuple(args.cine_frames))

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
    for n, r in cine.items():
        console.print(f"colour cine 256x256, {n} frames ({r['file_mb']:.1f} MB): check peak {r['check']:.1f} MB "
                      f"(decoding every frame: {r['decode_all_frames']:.1f} MB)")
    result = {
        "bench": "loading", "patients": args.patients, "image_size": cfg.task.image_size, "batch_size": cfg.federation.batch_size,
        "torch_threads": torch.get_num_threads(), "machine": platform.platform(), "loading": rows,
        "epoch_img_s": epoch, "training_img_s": train,
        "warm_over_training": {k: r["warm_img_s"] / train for k, r in rows.items()} if train else None,
        "goal_warm_over_training": 3.0,
        "multiframe_peak_mb": cine,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "bench_loading.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
