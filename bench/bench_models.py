"""Federated vs pooled, multimodal vs single-modality, on the synthetic hospitals.

Runs `fedmsk simulate` for each model and `fedmsk central` for MM-CL, all on the same
synthetic federation (same seed, splits and test patients), prints a table with the oracle
AUC beside it and writes bench/results/models.json. The README's results table comes from
this output.

    python bench/bench_models.py [--models mmcl,image_only,...] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from shared.config import compose
from simulation.central import central
from simulation.runner import simulate
from simulation.synth import write_federation

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mmcl,late_fusion,image_only,clinical_only,logreg")
    ap.add_argument("--central", default="mmcl", help="models also trained pooled")
    ap.add_argument("--out", default="runs/bench-models")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    data_root = out / "sites"
    base = [f"data_root={data_root}", *args.overrides]
    if not data_root.exists():
        write_federation(compose(base))
    console = Console(width=150)
    rows = []
    jobs = [("federated", m) for m in args.models.split(",")] + [("pooled", m) for m in args.central.split(",") if m]
    for mode, model in jobs:
        cfg = compose(base + [f"model={model}", f"run_dir={out / f'{mode}-{model}'}"])
        start = time.perf_counter()
        summary = (simulate if mode == "federated" else central)(cfg, console)
        seconds = time.perf_counter() - start
        pooled = summary["pooled_test"]
        rows.append({"mode": mode, "model": model, "seconds": round(seconds, 1), **pooled,
                     "auc_site_mean": summary["test_global"]["auc"]})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "models.json").write_text(json.dumps({"overrides": base, "rows": rows}, indent=2))
    table = Table(title="pooled test patients of all sites (same patients for every row)")
    for col in ("mode", "model", "AUC", "ACC", "F1", "SEN", "SPC", "PRE", "oracle AUC", "seconds"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["mode"], r["model"], *(f"{r[k]:.3f}" for k in ("auc", "acc", "f1", "sen", "spc", "pre")),
                      f"{r['oracle_auc']:.3f}" if r["oracle_auc"] is not None else "-", f"{r['seconds']:.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
