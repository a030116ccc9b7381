"""DP-SGD cost and utility: step time per Opacus grad-sample mode, and federated AUC at epsilon 1, 4, 8.

1. Step time: one MM-CL training step (forward, loss, backward, optimizer step; batch 16 at
   64x64, the DP-safe prototype loss) without DP and under each Opacus per-sample-gradient mode,
   measured side by side in one process (the modes take turns, so machine load hits them alike).
   A mode that cannot handle our model or loss is reported with the reason. The issue's goal: DP
   step / plain step at most 1.5x; client.privacy.GRAD_SAMPLE_MODE is set to the fastest valid mode.
2. Utility: `fedmsk simulate` on the synthetic 5-site federation with no DP and with a site budget
   of epsilon 1, 4, 8 (configs/privacy/eps*.yaml); each setting runs on a fresh copy of the sites so
   no privacy ledger carries over. Goal: at epsilon 8 at least 0.95 of the non-DP AUC.

Prints tables and writes bench/results/bench_dp.json.

    python bench/bench_dp.py [--steps 30] [--threads 1] [--skip-federated] [--epsilons 1,4,8] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from client.trainer import build_screener
from shared.config import compose

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("hooks", "functorch", "ew", "ghost")


class _LogitsOnly(nn.Module):
    """Ghost clipping needs a model whose output goes straight into a per-sample criterion."""

    def __init__(self, screener: nn.Module) -> None:
        super().__init__()
        self.screener = screener

    def forward(self, image: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
        return self.screener(image, clinical)["logits"]


def _batch(n: int, size: list[int], n_clinical: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(n, 1, *size, generator=g), "clinical": torch.randn(n, n_clinical, generator=g),
            "label": torch.arange(n) % 2}


def _make_step(mode: str, cfg, batch: dict[str, torch.Tensor]):
    """A closure running one training step in ``mode`` ('plain' = no DP), or raise why it cannot."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    screener = build_screener(cfg)
    opt = torch.optim.Adam(screener.parameters(), lr=1e-3)
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
        # Ghost clipping takes a per-sample criterion (reduction over the batch inside Opacus); our
        # Criterion returns (loss, parts) over several outputs, so only the CE on the logits fits.
        model, optimizer, criterion, _ = engine.make_private(
            module=_LogitsOnly(screener), optimizer=opt, data_loader=loader, criterion=nn.CrossEntropyLoss(),
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
    from shared.clinical import feature_names

    batch = _batch(batch_size, cfg.task.image_size, len(feature_names(cfg.task)))
    runners, invalid = {}, {}
    for mode in ("plain", *MODES):
        try:
            runners[mode] = _make_step(mode, cfg, batch)
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
    valid = [m for m in rows if m not in ("plain", "ghost")]
    return {"rows": rows, "invalid": invalid, "fastest_valid": min(valid, key=lambda m: rows[m]["median_s"]) if valid else None,
            "note_ghost": "ghost measured with CE on the logits only: it cannot take our Criterion (aux terms, branch logits)"}


def federated_auc(base: list[str], epsilons: list[float], out: Path, console: Console) -> list[dict]:
    from simulation.runner import simulate
    from simulation.synth import write_federation

    sites = out / "sites"
    if not sites.exists():
        write_federation(compose(base + [f"data_root={sites}"]))
    results = []
    for eps in [None, *epsilons]:
        label = "no DP" if eps is None else f"epsilon {eps:g}"
        fresh = out / ("sites-nodp" if eps is None else f"sites-eps{eps:g}")
        shutil.rmtree(fresh, ignore_errors=True)
        shutil.copytree(sites, fresh)  # no ledger carries over between settings
        extra = ["model.aux_loss=prototype"] if eps is None else [
            "privacy.enabled=true", f"privacy.target_epsilon={eps}", "model.aux_loss=prototype"]
        cfg = compose(base + extra + [f"data_root={fresh}", f"run_dir={out / ('run-' + fresh.name)}"])
        start = time.perf_counter()
        summary = simulate(cfg, console)
        rows = [json.loads(x) for x in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
        eps_sites = {r["site"]: r.get("epsilon", 0.0) for r in rows if r["phase"] == "train" and r["site"] != "global"}
        results.append({
            "setting": label, "target_epsilon": eps, "test_auc": summary["test_global"]["auc"],
            "pooled_test_auc": summary["pooled_test"]["auc"], "oracle_auc": summary["pooled_test"]["oracle_auc"],
            "epsilon_spent_per_site": eps_sites, "seconds": time.perf_counter() - start,
        })
    ref = results[0]["test_auc"]
    for r in results:
        r["auc_vs_no_dp"] = r["test_auc"] / ref if ref else None
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a simulated site uses 1)")
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--skip-federated", action="store_true")
    ap.add_argument("--epsilons", default="1,4,8")
    ap.add_argument("--out", default="runs/bench-dp")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for the federation, e.g. rounds=5")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    console = Console()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "bench_dp.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report["machine"] = {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads}
    if not args.skip_steps:
        cfg = compose(["model=mmcl", "model.aux_loss=prototype"])
        res = step_times(cfg, args.steps, args.batch)
        table = Table("mode", "median step (s)", "DP / plain", title=f"MM-CL step, batch {args.batch}, {cfg.task.image_size}")
        for m, r in res["rows"].items():
            table.add_row(m + (" *" if m == "ghost" else ""), f"{r['median_s']:.4f}", f"{r['ratio']:.2f}x")
        for m, why in res["invalid"].items():
            table.add_row(m, "invalid", why)
        console.print(table)
        console.print(f"fastest valid mode: [bold]{res['fastest_valid']}[/]; * {res['note_ghost']}")
        report["step_time"] = res | {"batch": args.batch, "steps": args.steps, "image_size": cfg.task.image_size}
    if not args.skip_federated:
        base = ["num_sites=5", *args.overrides]
        rows = federated_auc(base, [float(e) for e in args.epsilons.split(",")], Path(args.out).resolve(), console)
        table = Table("setting", "test AUC", "vs no DP", "epsilon spent (max over sites)", "oracle AUC", "s",
                      title="federated MM-CL (prototype aux loss), 5 synthetic sites")
        for r in rows:
            spent = max(r["epsilon_spent_per_site"].values(), default=0.0)
            table.add_row(r["setting"], f"{r['test_auc']:.3f}", f"{r['auc_vs_no_dp']:.3f}", f"{spent:.2f}",
                          f"{r['oracle_auc']:.3f}", f"{r['seconds']:.0f}")
        console.print(table)
        report["federated"] = {"overrides": base, "rows": rows}
    path.write_text(json.dumps(report, indent=1))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
