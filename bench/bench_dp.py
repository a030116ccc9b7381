"""DP-SGD cost and utility: step time per Opacus grad-sample mode, the DP training settings sweep,
and the federated AUC grid {model} x {no DP, eps 8, 4, 1} x {random init, public pretraining} x seeds.

1. ``--steps``: one MM-CL training step (forward, loss, backward, optimizer step; batch 16 at
   64x64, the DP-safe prototype loss) without DP and under each Opacus per-sample-gradient mode,
   measured side by side in one process (the modes take turns, so machine load hits them alike).
   A mode that cannot handle our model or loss is reported with the reason.
2. ``--sweep``: the DP training settings of configs/privacy/eps*.yaml and the fine-tuning mode of a
   run from public weights (PUBLIC_DP) are chosen here, under DP, on synthetic *tuning* federations
   (synth seeds 100 and 101) that none of the grid's federations (seeds 0, 1, 2) shares: never on a
   hospital's data, never on the grid's test patients.
3. ``--audit``: the empirical privacy audit of the test suite (simulation.audit) with 1000
   canaries, at epsilon 1, 4, 8 and without DP, 3 seeds each.
4. ``--grid``: each cell is one federation run in process (the real ClientApp and round loop,
   without Ray), 5 synthetic sites (``--sites small``: 60-108 training patients a site, ``medium``:
   120-216), on a fresh copy of the sites so no privacy ledger carries over; test AUC on all sites'
   test patients pooled, oracle AUC beside. "public" cells start from weights pretrained by
   `fedmsk pretrain-public` on 5 other synthetic hospitals (synth seed 50), the data the consortium
   treats as public, and fine-tune under DP with PUBLIC_DP. A cell run under an earlier version of
   its preset is run again. ``--steps N --step-models ...`` puts each model's DP step cost beside.

Prints tables and writes bench/results/bench_dp.json (each part under its own key; a later run of one
part keeps the others).

    python bench/bench_dp.py --steps 30
    python bench/bench_dp.py --sweep
    python bench/bench_dp.py --audit
    python bench/bench_dp.py --grid [--cells mmcl:random,mmcl:public] [--epsilons none,8,4,1] [--seeds 0,1,2]
        [--sites small|medium] [--json part.json]; --merge part.json ... renders several into --json
    python bench/bench_dp.py --steps 5 --step-models mmcl,image_only,clinical_only,logreg
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
from contextlib import contextmanager, nullcontext
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
STEP_MODELS = {  # each model's default task; fracture3d at its 32^3 CT size
    "mmcl": ["model=mmcl"], "late_fusion": ["model=late_fusion"], "image_only": ["model=image_only"],
    "fracture3d": ["task=vertebral_fracture", "model=fracture3d"],
}
OPACUS_HOOKS = "hooks (Opacus samplers)"  # hooks mode with Opacus' own conv sampler and torch.func fallbacks


def _batch(n: int, size: list[int], n_clinical: int, n_classes: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(n, 1, *size, generator=g), "clinical": torch.randn(n, n_clinical, generator=g),
            "label": torch.arange(n) % n_classes}


@contextmanager
def _opacus_samplers():
    """Opacus' own grad samplers in place of client.grad_samplers' (the "before" of the same run)."""
    from opacus.grad_sample import GradSampleModule
    from opacus.grad_sample.conv import compute_conv_grad_sample

    import client.grad_samplers as ours

    registry = GradSampleModule.GRAD_SAMPLERS
    saved = dict(registry)
    registry.update({torch.nn.Conv2d: compute_conv_grad_sample, torch.nn.Conv3d: compute_conv_grad_sample})
    for cls in (ours.LearnedScale, ours.PrototypeHead):
        registry.pop(cls, None)
    try:
        yield
    finally:
        registry.clear()
        registry.update(saved)


def _make_step(mode: str, cfg, batch: dict[str, torch.Tensor]):
    """A closure running one training step in ``mode`` ('plain' = no DP; OPACUS_HOOKS = hooks with
    Opacus' samplers), or raise why it cannot."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    import client.privacy  # noqa: F401  (registers fedmsk's grad samplers, as at a site)

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
    with _opacus_samplers() if mode == OPACUS_HOOKS else nullcontext():  # wrapped as it will run
        model, optimizer, _ = engine.make_private(module=screener, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                                                  max_grad_norm=1.0, grad_sample_mode=mode.split()[0], poisson_sampling=False)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = screener.criterion(model(image, clinical), label)
        loss.backward()
        optimizer.step()
    if mode == OPACUS_HOOKS:
        def opacus_step() -> None:
            with _opacus_samplers():
                step()
        opacus_step()
        return opacus_step
    step()  # fail here, not in the timing loop
    return step


def step_times(cfg, steps: int, batch_size: int, others: tuple[str, ...] = ()) -> dict:
    """Every mode on ``cfg``'s model (MM-CL), the DP fine-tuning route (model.finetune=norm_heads:
    pretrained encoders kept, their norm layers and the heads trained), and plain / hooks / Opacus'
    hooks / ghost on the ``others`` of STEP_MODELS, all interleaved in one loop (load spikes hit every runner
    alike). Wall-clock and thread-CPU medians: on a shared machine the CPU time is the steadier figure."""
    from dataclasses import replace

    from shared.clinical import feature_names

    def batch_for(c) -> dict[str, torch.Tensor]:
        return _batch(batch_size, c.task.image_size, len(feature_names(c.task)), len(c.task.class_names or [0, 1]))

    tuned = replace(cfg, model=replace(cfg.model, finetune="norm_heads"))
    plan = [("", m, cfg) for m in ("plain", "hooks", OPACUS_HOOKS, *(x for x in MODES if x != "hooks"))]
    plan += [("", "plain norm_heads", tuned), ("", "hooks norm_heads", tuned)]
    for name in others:
        other = compose(STEP_MODELS[name] + list(SAME_MODEL))
        plan += [(name, m, other) for m in ("plain", "hooks", OPACUS_HOOKS, "ghost")]
    runners, invalid = {}, {}
    for model, mode, c in plan:
        try:
            runners[(model, mode)] = _make_step(mode.split(" norm_heads")[0], c, batch_for(c))
        except Exception as exc:  # a mode Opacus cannot run on our model: reported, not fatal
            invalid[(model, mode)] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    wall: dict = {k: [] for k in runners}
    cpu: dict = {k: [] for k in runners}
    for k in runners:  # warm-up
        runners[k]()
    for _ in range(steps):
        for k, run in runners.items():
            t, c0 = time.perf_counter(), time.thread_time()
            run()
            cpu[k].append(time.thread_time() - c0)
            wall[k].append(time.perf_counter() - t)

    def rows(model: str) -> dict:
        base_w, base_c = statistics.median(wall[(model, "plain")]), statistics.median(cpu[(model, "plain")])
        return {m: {"median_s": statistics.median(wall[(mm, m)]), "ratio": statistics.median(wall[(mm, m)]) / base_w,
                    "cpu_median_s": statistics.median(cpu[(mm, m)]), "cpu_ratio": statistics.median(cpu[(mm, m)]) / base_c}
                for (mm, m) in runners if mm == model}

    main_rows = rows("")
    valid = [m for m in main_rows if m in MODES]
    return {"rows": main_rows, "invalid": {m: why for (mm, m), why in invalid.items() if mm == ""},
            "fastest_valid": min(valid, key=lambda m: main_rows[m]["median_s"]) if valid else None,
            "models": {name: {"rows": rows(name), "invalid": {m: why for (mm, m), why in invalid.items() if mm == name}}
                       for name in others}}


# ---------------------------------------------------------------------------- 2./3. federated runs
# training patients a site (60% of its patients): small 60-108 (synth defaults 180,140,100,160,120),
# medium 120-216 (twice as many); the seeds' cohorts split across a consortium are this size
SITES = {"small": [], "medium": ["synth.patients_per_site=[360,280,200,320,240]"]}
# a run started from public weights fine-tunes under DP only the encoders' normalisation layers and
# the heads (model.finetune=norm_heads, chosen by --sweep); without DP it trains every layer
PUBLIC_DP = ["model.finetune=norm_heads"]
PAIRS = [(m, i) for i in ("random", "public") for m in ("mmcl", "image_only", "clinical_only", "logreg")]


def write_sites(root: Path, seed: int, sites: str = "small") -> Path:
    """The synthetic federation of ``seed`` under ``root``, written once; a lock file lets grids run
    in parallel processes share it (two writers of one folder would remove each other's files)."""
    import fcntl

    from simulation.synth import write_federation

    folder = root / f"sites-{sites}-seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "oracle.csv").is_file():
            write_federation(compose(FEDERATION + [f"seed={seed}", f"data_root={folder}", *SITES[sites]]))
    return folder


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


def cell_overrides(out: Path, model: str, init: str, eps: float | None, accountant: str | None = None) -> list[str]:
    """A grid cell's config: ``model`` is a model name, or ``mmcl@<aux>`` for MM-CL with another
    DP-safe auxiliary loss (random init only: the public weights carry the prototype head).
    ``accountant``: rdp instead of the preset's prv where PRV's CPU cost (seconds per epsilon on a
    loaded CPU, ~80 per cell) does not fit; RDP is looser, so it adds noise for the same epsilon and
    the AUC it gives is a lower bound for the preset's."""
    name, _, aux = model.partition("@")
    ov = [f"model={name}", *SAME_MODEL, *PRESETS[eps]]
    if accountant and eps is not None:
        ov.append(f"privacy.accountant={accountant}")
    if aux:
        ov.append(f"model.aux_loss={aux}")  # a value override wins over the preset's aux_loss
    if init == "public":
        if aux:
            raise SystemExit(f"--cells {model}:public: the public weights are pretrained with the prototype loss only")
        ov.append(f"model.pretrained_path={pretrain(out, name)}")
        ov += PUBLIC_DP if eps is not None else []
    return ov


# The presets' DP training settings were chosen here, under DP, on tuning federations of their own
# (synth seeds 100 and 101), which none of the grid's federations (seeds 0, 1, 2) or the public
# pretraining sites (seed 50) shares: never on a hospital's data, never on the grid's test patients.
# Each candidate: (name, init, epsilon, overrides on top of the preset); one run per tuning seed.
SWEEP = [
    ("sgd lr 0.1, batch 32", "random", 1.0, ["privacy.lr=0.1"]),
    ("sgd lr 0.03, batch 32", "random", 1.0, ["privacy.lr=0.03"]),
    ("sgd lr 0.1, 1 local epoch", "random", 1.0, ["privacy.lr=0.1", "privacy.local_epochs=1"]),
    ("sgd lr 0.1, encoders frozen at random init (norm_heads)", "random", 1.0, ["privacy.lr=0.1", "model.finetune=norm_heads"]),
    ("sgd lr 0.1, batch 32", "random", 8.0, ["privacy.lr=0.1"]),
    ("sgd lr 0.03, batch 32", "random", 8.0, ["privacy.lr=0.03"]),
    ("all layers, sgd lr 0.1", "public", 1.0, ["model.finetune=all", "privacy.lr=0.1"]),
    ("all layers, sgd lr 0.03", "public", 1.0, ["model.finetune=all", "privacy.lr=0.03"]),
    ("norm_heads, sgd lr 0.1", "public", 1.0, ["model.finetune=norm_heads", "privacy.lr=0.1"]),
    ("norm_heads, sgd lr 0.03", "public", 1.0, ["model.finetune=norm_heads", "privacy.lr=0.03"]),
]
TUNING_SEEDS = (100, 101)


def sweep(out: Path, seeds: tuple[int, ...], console: Console) -> list[dict]:
    """Every SWEEP candidate (MM-CL, prototype loss) and the no-DP reference of each init, on each tuning seed."""
    rows = []
    refs = [("no DP", init, None, []) for init in ("random", "public")]
    for name, init, eps, extra in refs + SWEEP:
        for seed in seeds:
            ov = [*cell_overrides(out, "mmcl", init, None), *PRESETS[eps], *extra, f"seed={seed}"]
            res = run_federated(write_sites(out, seed), out / "cell-sweep", ov)
            rows.append({"setting": name, "init": init, "epsilon": eps, "seed": seed, **res})
            console.print(f"  sweep {init} eps {eps} {name} seed {seed}: AUC {res['test_auc']:.3f} ({res['seconds']:.0f} s)")
    return rows


def sweep_table(rows: list[dict]) -> str:
    """Mean test AUC per candidate over the tuning seeds (the choice is the best mean per init and epsilon)."""
    groups: dict[tuple, list[tuple[int, float]]] = {}
    for r in rows:
        groups.setdefault((r["init"], r["epsilon"], r["setting"]), []).append((r["seed"], r["test_auc"]))
    lines = ["| init | DP | setting | test AUC (tuning seed: AUC) | mean |", "|---|---|---|---|---|"]
    for (init, eps, name), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], -(kv[0][1] or 99), kv[0][2])):
        lines.append(f"| {init} | {'no DP' if eps is None else f'eps {eps:g}'} | {name} | "
                     f"{', '.join(f'{seed}: {a:.3f}' for seed, a in runs)} | {statistics.mean(a for _, a in runs):.3f} |")
    return "\n".join(lines)


def pretrain(out: Path, model: str) -> Path:
    """Public encoders for ``model``: `fedmsk pretrain-public` on 5 other synthetic hospitals (synth seed 50)."""
    from simulation.pretrain_public import WEIGHTS, pretrain_public

    weights = out / f"public-{model}" / WEIGHTS
    if not weights.is_file():
        public = write_sites(out, 50)
        pretrain_public(compose(FEDERATION + [f"model={model}", *SAME_MODEL, "seed=50", f"data_root={public}",
                                              f"run_dir={weights.parent}"]), Console(quiet=True))
    return weights


def grid_signature(sites: str) -> dict:
    """What every cell of a grid depends on besides model, init, epsilon and seed."""
    return {"federation": FEDERATION + SITES[sites], "public_dp": PUBLIC_DP}


def preset_text(eps: float | None) -> str:
    """The preset file a cell ran under: a cell run under an earlier version of it is run again."""
    from shared.config import CONFIG_DIR

    return "" if eps is None else (CONFIG_DIR / "privacy" / f"{PRESETS[eps][0].split('=')[1]}.yaml").read_text()


def grid(out: Path, pairs: list[tuple[str, str]], epsilons: list[float | None], seeds: list[int], sites: str,
         path: Path, report: dict, console: Console, accountant: str | None = None) -> list[dict]:
    """Every cell once, (model, init) pairs in the order given, all seeds of a setting together;
    each cell is appended to the JSON as it finishes (a partial grid is still a result)."""
    key = f"grid_{sites}"
    if report.get(key, {}).get("signature") != grid_signature(sites):
        report[key] = {"signature": grid_signature(sites), "cells": []}  # another federation: nothing comparable
    cells = report[key]["cells"]
    cells[:] = [c for c in cells if c.get("preset") == preset_text(c["epsilon"])]  # presets changed since: rerun
    done = {(c["model"], c["epsilon"], c["init"], c["seed"]) for c in cells}
    for model, init in pairs:
        for eps in epsilons:
            for seed in seeds:
                if (model, eps, init, seed) in done:
                    continue
                res = run_federated(write_sites(out, seed, sites), out / f"cell-{path.stem}",  # one per process
                                    [*cell_overrides(out, model, init, eps, accountant), f"seed={seed}"])
                cells.append({"model": model, "epsilon": eps, "init": init, "seed": seed, "sites": sites,
                              "preset": preset_text(eps), "accountant": None if eps is None else accountant or "preset", **res})
                path.write_text(json.dumps(report, indent=1))
                console.print(f"  {sites} {model} eps {eps} {init} seed {seed}: AUC {res['test_auc']:.3f} ({res['seconds']:.0f} s)")
    return cells


def merge_grids(report: dict, other: dict) -> None:
    """Add another results file's grid cells (same federation and PUBLIC_DP) to ``report``; a cell
    both ran (same model, epsilon, init, seed and preset) is kept once, the first."""
    for key, part in other.items():
        if not (key.startswith("grid_") and isinstance(part, dict) and "cells" in part):
            continue
        mine = report.setdefault(key, {"signature": part["signature"], "cells": []})
        if mine["signature"] != part["signature"]:
            raise SystemExit(f"--merge: {key} of the other file ran on another federation: {part['signature']}")
        seen = {(c["model"], c["epsilon"], c["init"], c["seed"], c.get("preset")) for c in mine["cells"]}
        mine["cells"] += [c for c in part["cells"] if (c["model"], c["epsilon"], c["init"], c["seed"], c.get("preset")) not in seen]


def grid_table(cells: list[dict], step_cost: dict[str, float], pairs: list[tuple[str, str]]) -> str:
    """The README table: mean +- SD of test AUC over seeds, and the ratio to the same model and init
    without DP; every requested (model, init) row is listed, cells without runs as 'not run'.

    A seed run twice (DP noise and sampling come from OS entropy, so a rerun differs) counts once,
    as the mean of its runs; the seeds column gives the fewest seeds of the row's cells, and the runs
    behind them where a seed ran more than once."""
    import numpy as np

    epsilons = [None, 8.0, 4.0, 1.0]
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["model"], c["init"], c["epsilon"]), []).append(c)
    rows = list(dict.fromkeys(pairs + [(m, i) for m, i, _ in groups]))
    lines = ["| model | init | no DP | eps 8 | eps 4 | eps 1 | seeds | oracle AUC | DP step / plain step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model, init in rows:
        ref = groups.get((model, init, None))
        ref_auc = np.mean([r["test_auc"] for r in ref]) if ref else None
        out, seeds, oracle = [], set(), []
        for eps in epsilons:
            runs = groups.get((model, init, eps))
            if not runs:
                out.append("not run")
                continue
            by_seed: dict[int, list[float]] = {}
            for r in runs:
                by_seed.setdefault(r["seed"], []).append(r["test_auc"])
            auc = np.array([np.mean(v) for v in by_seed.values()])
            seeds.add((len(by_seed), len(runs)))
            oracle += [r["oracle_auc"] for r in runs]
            text = f"{auc.mean():.3f} +- {auc.std(ddof=1) if len(auc) > 1 else 0:.3f}"
            out.append(text + (f" ({auc.mean() / ref_auc:.3f}x)" if eps is not None and ref_auc else ""))
        cost = step_cost.get(f"{model.partition('@')[0]}:{'norm_heads' if init == 'public' else 'all'}")
        fewest = min(seeds, default=None)
        seeds_text = "-" if fewest is None else f"{fewest[0]}" + (f" ({max(n for _, n in seeds)} runs)" if any(n > k for k, n in seeds) else "")
        lines.append(f"| {model} | {init} | {' | '.join(out)} | {seeds_text} | "
                     f"{np.mean(oracle):.3f} | {'-' if cost is None else f'{cost:.2f}x'} |" if oracle else
                     f"| {model} | {init} | {' | '.join(out)} | - | - | {'-' if cost is None else f'{cost:.2f}x'} |")
    return "\n".join(lines)


def step_cost_of(report: dict) -> dict[str, float]:
    """The grid's step-cost column from the ``--steps`` part of the same JSON (its batch and size) when
    no grid-size ``--step-models`` run is there: hooks over plain, all layers and norm_heads."""
    st = report.get("step_time", {})
    costs = {}
    for name, part in [("mmcl", st), *st.get("models", {}).items()]:
        rows = part.get("rows", {})
        if "hooks" in rows and "plain" in rows:
            costs[f"{name}:all"] = rows["hooks"]["ratio"] / rows["plain"]["ratio"]
        if "hooks norm_heads" in rows and "plain norm_heads" in rows:
            costs[f"{name}:norm_heads"] = rows["hooks norm_heads"]["ratio"] / rows["plain norm_heads"]["ratio"]
    return costs


def step_costs(models: list[str], steps: int, batch: int) -> dict[str, float]:
    """DP (hooks) over plain step time per model at the grid's input size, trained as the grid trains it
    (all layers; public init: norm_heads), from step_times (one interleaved loop per model)."""
    costs = {}
    for model in models:
        cfg = compose(FEDERATION + [f"model={model}", *SAME_MODEL])
        rows = step_times(cfg, steps, batch)["rows"]
        costs[f"{model}:all"] = rows["hooks"]["ratio"]
        if "hooks norm_heads" in rows:
            costs[f"{model}:norm_heads"] = rows["hooks norm_heads"]["ratio"] / rows["plain norm_heads"]["ratio"]
    return costs


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
    ap.add_argument("--sweep", action="store_true", help="the presets' DP settings on the tuning federations (seeds 100, 101)")
    ap.add_argument("--out", default="runs/bench-dp")
    ap.add_argument("--audit", action="store_true", help="the canary audit at full size (1000 canaries)")
    ap.add_argument("--grid", action="store_true")
    ap.add_argument("--cells", default=",".join(f"{m}:{i}" for m, i in PAIRS),
                    help="model:init pairs, in order (model mmcl@views etc.: MM-CL with another DP-safe aux loss)")
    ap.add_argument("--epsilons", default="none,8,4,1")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sites", choices=list(SITES), default="small", help="site size of the grid's federations")
    ap.add_argument("--step-models", default="", help="models whose DP step cost (hooks / plain, grid input size, "
                    "batch 32) goes beside the grid; needs --steps")
    ap.add_argument("--accountant", choices=["prv", "rdp"], help="override the presets' accountant in the grid's DP "
                    "cells (rdp: cheaper, looser, so a lower bound on the preset's AUC)")
    ap.add_argument("--json", default=str(RESULTS / "bench_dp.json"), help="the results file (read, updated, written)")
    ap.add_argument("--merge", nargs="*", default=[], help="other results files whose grids to copy into --json "
                    "(grids run in parallel processes)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    console = Console()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = Path(args.json)
    report = json.loads(path.read_text()) if path.exists() else {}
    report["machine"] = {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads}
    out = Path(args.out).resolve()
    if args.steps and args.step_models:
        report["grid_step_cost"] = step_costs(args.step_models.split(","), args.steps, 32)
    if args.steps and not args.step_models:
        cfg = compose(["model=mmcl", "model.aux_loss=prototype"])
        res = step_times(cfg, args.steps, args.batch, others=tuple(m for m in STEP_MODELS if m != "mmcl"))
        for name, part in {"mmcl": res, **res["models"]}.items():
            table = Table("mode", "median step (s)", "DP / plain", "CPU s", "CPU DP / plain",
                          title=f"{name} step, batch {args.batch}")
            for m, r in part["rows"].items():
                table.add_row(m, f"{r['median_s']:.4f}", f"{r['ratio']:.2f}x", f"{r['cpu_median_s']:.4f}", f"{r['cpu_ratio']:.2f}x")
            for m, why in part["invalid"].items():
                table.add_row(m, "invalid", why)
            console.print(table)
        console.print(f"fastest valid mode: [bold]{res['fastest_valid']}[/]")
        report["step_time"] = res | {"batch": args.batch, "steps": args.steps, "image_size": cfg.task.image_size}
    if args.sweep:
        rows = sweep(out, TUNING_SEEDS, console)
        report["sweep"] = {"federation": FEDERATION, "tuning_seeds": list(TUNING_SEEDS), "rows": rows,
                           "table": sweep_table(rows)}
        console.print(report["sweep"]["table"])
    if args.audit:
        rows = audit([1.0, 4.0, 8.0], [0, 1, 2], 1000, 400, out)
        table = Table("claimed epsilon", "seed", "correct / guesses", "empirical epsilon lower bound",
                      title="one-run canary audit (simulation.audit), 1000 canaries, clinical logreg")
        for r in rows:
            table.add_row("no DP" if r["target_epsilon"] is None else f"{r['epsilon_claimed']:.2f}", str(r["seed"]),
                          f"{r['correct']} / {r['guesses']}", f"{r['epsilon_lower_bound']:.2f}")
        console.print(table)
        report["audit"] = rows
    for other in args.merge:
        merge_grids(report, json.loads(Path(other).read_text()))
    pairs = [tuple(c.split(":")) for c in args.cells.split(",")]
    if args.grid:
        eps = [None if e == "none" else float(e) for e in args.epsilons.split(",")]
        grid(out, pairs, eps, [int(x) for x in args.seeds.split(",")], args.sites, path, report, console, args.accountant)
    for sites in SITES:  # (re)rendered on every run, with the latest step costs
        if report.get(f"grid_{sites}", {}).get("cells"):
            cells = report[f"grid_{sites}"]["cells"]
            report[f"grid_{sites}"]["table"] = grid_table(cells, report.get("grid_step_cost") or step_cost_of(report), PAIRS)
            console.print(f"{sites} sites:\n" + report[f"grid_{sites}"]["table"])
    if "grid" in report:  # the 3-seed grid of the earlier presets (eps 1 at lr 0.1, public cells all layers)
        report["earlier_presets_grid"] = report.pop("grid")
    path.write_text(json.dumps(report, indent=1))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
