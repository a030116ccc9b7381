"""DP-SGD cost and utility: step time per Opacus grad-sample mode, the DP training settings sweep,
and the federated AUC grid {model} x {no DP, eps 8, 4, 1} x {random init, public pretraining} x seeds.

1. ``--steps``: one MM-CL training step (forward, loss, backward, optimizer step; batch 16 at
   64x64, the DP-safe prototype loss) without DP and under each Opacus per-sample-gradient mode,
   measured side by side in one process (the modes take turns, so machine load hits them alike).
   A mode that cannot handle our model or loss is reported with the reason.
2. ``--sweep``: the DP training settings (optimizer, lr, batch size) of configs/privacy/eps*.yaml
   are chosen here, under DP, on a synthetic *tuning* federation (synth seed 100) that none of the
   grid's federations (seeds 0, 1, 2) shares: never on a hospital's data.
3. ``--audit``: the empirical privacy audit of the test suite (simulation.audit) with 1000
   canaries, at epsilon 1, 4, 8 and without DP, 3 seeds each.
4. ``--grid``: each cell is one federation run in process (the real ClientApp and round loop,
   without Ray), 5 synthetic sites of 50-110 training patients, on a fresh copy of the sites so no
   privacy ledger carries over; test AUC on all sites' test patients pooled, oracle AUC beside.
   "public" cells start from encoders pretrained by `fedmsk pretrain-public` on 5 other
   synthetic hospitals (synth seed 50), the data the consortium treats as public.

Prints tables and writes bench/results/bench_dp.json (each part under its own key; a later run of one
part keeps the others).

    python bench/bench_dp.py --steps 30
    python bench/bench_dp.py --sweep
    python bench/bench_dp.py --audit
    python bench/bench_dp.py --grid [--cells mmcl:random,mmcl:public] [--epsilons none,8,1] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.inprocess_grid: the round loop without Ray

import torch
from rich.console import Console
from rich.table import Table

from client.trainer import build_screener
from shared.config import compose

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("hooks", "functorch", "ew", "ghost")
SAME_MODEL = ["model.aux_loss=prototype"]  # the DP presets' aux loss in every grid cell and the pretraining
PRESETS = {None: [], 8.0: ["privacy=eps8"], 4.0: ["privacy=eps4"], 1.0: ["privacy=eps1"]}
# synth defaults: 180,140,100,160,120 patients a site, 60% of them train (108, 84, 60, 96, 72); 32x32 inputs
# and 4 rounds x 2 local epochs keep a cell at a few CPU minutes on the 2-core machine
FEDERATION = ["num_sites=5", "rounds=4", "task.image_size=[32,32]"]


# ---------------------------------------------------------------------------- 1. step time
def _batch(n: int, size: list[int], n_clinical: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(n, 1, *size, generator=g), "clinical": torch.randn(n, n_clinical, generator=g),
            "label": torch.arange(n) % 2}


def _make_step(mode: str, cfg, batch: dict[str, torch.Tensor]):
    """A closure running one training step in ``mode`` ('plain' = no DP), or raise why it cannot."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    screener = build_screener(cfg)
    opt = torch.optim.Adam([p for p in screener.parameters() if p.requires_grad], lr=1e-3)
    image, clinical, label = batch["image"], batch["clinical"], batch["label"]
    if mode == "plain":
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss, _ = screener.criterion(screener(image, clinical), label)
            loss.backward()
            opt.step()
        return step
    loader = DataLoader(TensorDataset(image, clinical, label), batch_size=len(label))
    engine = PrivacyEngine(accountant="prv")
    if mode == "ghost":
        from client.privacy import GhostCriterion

        model, optimizer, criterion, _ = engine.make_private(
            module=screener, optimizer=opt, data_loader=loader, criterion=GhostCriterion(screener.criterion),
            noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost", poisson_sampling=False)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(image, clinical), label)
            loss.backward()
            optimizer.step()
        step()
        return step
    model, optimizer, _ = engine.make_private(module=screener, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                                              max_grad_norm=1.0, grad_sample_mode=mode, poisson_sampling=False)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = screener.criterion(model(image, clinical), label)
        loss.backward()
        optimizer.step()
    step()  # fail here, not in the timing loop
    return step


def step_times(cfg, steps: int, batch_size: int) -> dict:
    """Every mode on all layers, plus the DP fine-tuning route (model.finetune=norm_heads: pretrained
    encoders kept, their norm layers and the heads trained), all interleaved in one loop."""
    from dataclasses import replace

    from shared.clinical import feature_names

    batch = _batch(batch_size, cfg.task.image_size, len(feature_names(cfg.task)))
    tuned = replace(cfg, model=replace(cfg.model, finetune="norm_heads"))
    runners, invalid = {}, {}
    for mode, c in [("plain", cfg), *((m, cfg) for m in MODES), ("plain norm_heads", tuned), ("hooks norm_heads", tuned)]:
        try:
            runners[mode] = _make_step(mode.split()[0], c, batch)
        except Exception as exc:  # a mode Opacus cannot run on our model: reported, not fatal
            invalid[mode] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    times: dict[str, list[float]] = {m: [] for m in runners}
    for m in runners:  # warm-up
        runners[m]()
    for _ in range(steps):
        for m, run in runners.items():  # interleaved: load spikes hit every mode alike
            t = time.perf_counter()
            run()
            times[m].append(time.perf_counter() - t)
    plain = statistics.median(times["plain"])
    rows = {m: {"median_s": statistics.median(t), "ratio": statistics.median(t) / plain} for m, t in times.items()}
    valid = [m for m in rows if m in MODES]
    return {"rows": rows, "invalid": invalid, "fastest_valid": min(valid, key=lambda m: rows[m]["median_s"]) if valid else None}


# ---------------------------------------------------------------------------- 2./3. federated runs
def write_sites(root: Path, seed: int, extra: list[str] = ()) -> Path:
    from simulation.synth import write_federation

    sites = root / f"sites-seed{seed}"
    if not (sites / "oracle.csv").is_file():
        write_federation(compose(FEDERATION + [f"seed={seed}", f"data_root={sites}", *extra]))
    return sites


def run_federated(sites: Path, work: Path, overrides: list[str]) -> dict:
    """One federation in process on a fresh copy of ``sites``: pooled test AUC, oracle, epsilon spent."""
    from client.ledger import PrivacyLedger
    from client.privacy import epsilon_of
    from client.site import list_sites
    from server.federation import run_federation
    from simulation.evaluation import load_federation, load_screener, pooled_test_metrics
    from tests.inprocess_grid import InProcessGrid

    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(sites, work / "sites")  # no ledger carries over between cells
    cfg = compose(FEDERATION + overrides + [f"data_root={work / 'sites'}", f"run_dir={work / 'run'}"])
    folders = list_sites(cfg.data_root)
    start = time.perf_counter()
    arrays, _ = run_federation(InProcessGrid({100 + i: {"partition-id": i} for i in range(len(folders))}), cfg, work / "run")
    pooled = pooled_test_metrics(load_screener(cfg, arrays.to_torch_state_dict()), cfg, load_federation(cfg, folders))
    spent = []
    for folder in folders:
        ledger = PrivacyLedger.load(folder)
        spent.append(epsilon_of(ledger.history, cfg.privacy.delta, cfg.privacy.accountant) if ledger.history else 0.0)
    return {"test_auc": pooled["auc"], "oracle_auc": pooled["oracle_auc"], "epsilon_max": max(spent),
            "seconds": time.perf_counter() - start}


SWEEP = {  # candidates for the presets' DP training settings (MM-CL, prototype aux loss)
    "adam lr 0.002 b16 (non-DP defaults)": ["privacy.optimizer=adam", "privacy.lr=0.002", "privacy.batch_size=16"],
    "adam lr 0.01 b16": ["privacy.optimizer=adam", "privacy.lr=0.01", "privacy.batch_size=16"],
    "sgd lr 0.1 b16": ["privacy.optimizer=sgd", "privacy.lr=0.1", "privacy.batch_size=16"],
    "sgd lr 0.1 b32": ["privacy.optimizer=sgd", "privacy.lr=0.1", "privacy.batch_size=32"],
}


def sweep(out: Path, epsilons: list[float], console: Console) -> list[dict]:
    """DP training settings under DP on the tuning federation (synth seed 100), each candidate
    overriding the preset's own privacy.optimizer / lr / batch_size."""
    sites = write_sites(out, 100)
    ref = run_federated(sites, out / "cell", ["model=mmcl", "seed=100"])
    rows = [{"epsilon": None, "setting": "no DP (federation defaults)", **ref}]
    console.print(f"  sweep no DP: AUC {ref['test_auc']:.3f} ({ref['seconds']:.0f} s)")
    for eps in epsilons:
        for name, settings in SWEEP.items():
            res = run_federated(sites, out / "cell", ["model=mmcl", "seed=100", *PRESETS[eps], *settings])
            rows.append({"epsilon": eps, "setting": name, **res})
            console.print(f"  sweep eps {eps:g} {name}: AUC {res['test_auc']:.3f} ({res['seconds']:.0f} s)")
    return rows


def pretrain(out: Path, model: str) -> Path:
    """Public encoders for ``model``: `fedmsk pretrain-public` on 5 other synthetic hospitals (synth seed 50)."""
    from simulation.pretrain_public import WEIGHTS, pretrain_public

    weights = out / f"public-{model}" / WEIGHTS
    if not weights.is_file():
        public = write_sites(out, 50)
        pretrain_public(compose(FEDERATION + [f"model={model}", *SAME_MODEL, "seed=50", f"data_root={public}",
                                              f"run_dir={weights.parent}"]), Console(quiet=True))
    return weights


def grid(out: Path, pairs: list[tuple[str, str]], epsilons: list[float | None], seeds: list[int],
         path: Path, report: dict, console: Console) -> list[dict]:
    """Every cell once, (model, init) pairs in the order given, all seeds of a setting together;
    each cell is appended to the JSON as it finishes (a partial grid is still a result)."""
    cells = report.setdefault("grid", {"federation": FEDERATION, "cells": []})["cells"]
    done = {(c["model"], c["epsilon"], c["init"], c["seed"]) for c in cells}
    for model, init in pairs:
        extra = [] if init == "random" else [f"model.pretrained_path={pretrain(out, model)}"]
        for eps in epsilons:
            for seed in seeds:
                if (model, eps, init, seed) in done:
                    continue
                res = run_federated(write_sites(out, seed), out / "cell",
                                    [f"model={model}", *SAME_MODEL, f"seed={seed}", *PRESETS[eps], *extra])
                cells.append({"model": model, "epsilon": eps, "init": init, "seed": seed, **res})
                path.write_text(json.dumps(report, indent=1))
                console.print(f"  {model} eps {eps} {init} seed {seed}: AUC {res['test_auc']:.3f} ({res['seconds']:.0f} s)")
    return cells


def grid_table(cells: list[dict], step_ratio: float | None) -> str:
    """The README table: mean +- SD of test AUC over seeds per cell, vs the same model without DP."""
    import numpy as np

    key = lambda c: (c["model"], c["init"], c["epsilon"])  # noqa: E731
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault(key(c), []).append(c)
    lines = ["| model | init | DP | test AUC (mean +- SD) | seeds | vs no DP | oracle AUC | epsilon spent (max) |",
             "|---|---|---|---|---|---|---|---|"]
    for (model, init, eps), rows in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], -(kv[0][2] or 99))):
        auc = np.array([r["test_auc"] for r in rows])
        ref = groups.get((model, init, None))
        ratio = auc.mean() / np.mean([r["test_auc"] for r in ref]) if ref and eps is not None else None
        lines.append(f"| {model} | {init} | {'no DP' if eps is None else f'eps {eps:g}'} | {auc.mean():.3f} +- "
                     f"{auc.std(ddof=1) if len(auc) > 1 else 0:.3f} | {len(rows)} | {'' if ratio is None else f'{ratio:.3f}x'} | "
                     f"{np.mean([r['oracle_auc'] for r in rows]):.3f} | {max(r['epsilon_max'] for r in rows):.2f} |")
    if step_ratio is not None:
        lines.append(f"\nDP step cost (MM-CL, hooks, same run): {step_ratio:.2f}x a plain step.")
    return "\n".join(lines)


def audit(epsilons: list[float], seeds: list[int], canaries: int, guesses: int, out: Path) -> list[dict]:
    """The suite's canary audit (simulation.audit) at full size: one training run per (epsilon, seed)."""
    from dataclasses import asdict

    from shared.config import PrivacyConfig
    from simulation.audit import canary_audit

    cfg = compose(["model=logreg", "model.aux_loss=none", "federation.batch_size=32", "federation.lr=0.05",
                   "federation.optimizer=sgd"])
    rows = []
    for eps in [None, *epsilons]:
        for seed in seeds:
            policy = None if eps is None else PrivacyConfig(enabled=True, target_epsilon=eps, accountant="prv")
            res = canary_audit(cfg, out / f"audit-{eps}-{seed}", policy=policy, canaries=canaries, patients=200,
                               guesses=guesses, seed=seed)
            rows.append({"target_epsilon": eps, "seed": seed, **asdict(res)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=0, help="time this many steps per grad-sample mode (0: skip)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a simulated site uses 1)")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-epsilons", default="1,8")
    ap.add_argument("--out", default="runs/bench-dp")
    ap.add_argument("--audit", action="store_true", help="the canary audit at full size (1000 canaries)")
    ap.add_argument("--grid", action="store_true")
    ap.add_argument("--cells", default="mmcl:random,image_only:random,clinical_only:random,logreg:random,"
                    "mmcl:public,image_only:public,clinical_only:public,logreg:public", help="model:init pairs, in order")
    ap.add_argument("--epsilons", default="none,8,4,1")
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    console = Console()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "bench_dp.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report["machine"] = {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads}
    out = Path(args.out).resolve()
    if args.steps:
        cfg = compose(["model=mmcl", "model.aux_loss=prototype"])
        res = step_times(cfg, args.steps, args.batch)
        table = Table("mode", "median step (s)", "DP / plain", title=f"MM-CL step, batch {args.batch}, {cfg.task.image_size}")
        for m, r in res["rows"].items():
            table.add_row(m, f"{r['median_s']:.4f}", f"{r['ratio']:.2f}x")
        for m, why in res["invalid"].items():
            table.add_row(m, "invalid", why)
        console.print(table)
        console.print(f"fastest valid mode: [bold]{res['fastest_valid']}[/]")
        report["step_time"] = res | {"batch": args.batch, "steps": args.steps, "image_size": cfg.task.image_size}
    if args.sweep:
        rows = sweep(out, [float(e) for e in args.sweep_epsilons.split(",")], console)
        table = Table("epsilon", "setting", "test AUC", "oracle", "s", title="DP training settings, tuning federation (synth seed 100)")
        for r in rows:
            table.add_row("-" if r["epsilon"] is None else f"{r['epsilon']:g}", r["setting"], f"{r['test_auc']:.3f}", f"{r['oracle_auc']:.3f}", f"{r['seconds']:.0f}")
        console.print(table)
        report["sweep"] = {"federation": FEDERATION, "synth_seed": 100, "rows": rows}
    if args.audit:
        rows = audit([1.0, 4.0, 8.0], [0, 1, 2], 1000, 400, out)
        table = Table("claimed epsilon", "seed", "correct / guesses", "empirical epsilon lower bound",
                      title="one-run canary audit (simulation.audit), 1000 canaries, clinical logreg")
        for r in rows:
            table.add_row("no DP" if r["target_epsilon"] is None else f"{r['epsilon_claimed']:.2f}", str(r["seed"]),
                          f"{r['correct']} / {r['guesses']}", f"{r['epsilon_lower_bound']:.2f}")
        console.print(table)
        report["audit"] = rows
    if args.grid:
        eps = [None if e == "none" else float(e) for e in args.epsilons.split(",")]
        pairs = [tuple(c.split(":")) for c in args.cells.split(",")]
        grid(out, pairs, eps, [int(x) for x in args.seeds.split(",")], path, report, console)
    if report.get("grid", {}).get("cells"):  # (re)rendered on every run, with the latest step ratio
        ratio = report.get("step_time", {}).get("rows", {}).get("hooks", {}).get("ratio")
        report["grid"]["table"] = grid_table(report["grid"]["cells"], ratio)
        console.print(report["grid"]["table"])
    path.write_text(json.dumps(report, indent=1))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
