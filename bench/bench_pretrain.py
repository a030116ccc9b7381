"""Label efficiency of pretraining: sarcopenia AUC at 10 %, 25 % and 100 % of each site's labels, from
random init vs federated self-supervised (`fedmsk pretrain`, pretrain=ssl: SimSiam + the public bank's variance term;
ssl-simsiam: SimSiam alone; ssl-public: the views against the public image bank) vs federated cross-modal
(pretrain=crossmodal) vs public (`fedmsk pretrain-public`) encoders, fine-tuned whole
(``model.finetune=all``) or as a linear probe of the frozen encoders (``model.finetune=heads``),
without DP and under the eps 8 preset, over seeds.

Each cell is one federation run in process (the real ClientApp and round loop, without Ray; as
bench/bench_dp.py) on a fresh copy of a small synthetic federation, scored on all sites' test
patients pooled (exact AUC, oracle beside). ``task.label_fraction`` chooses the labelled training
patients (stratified, nested: the 10 % are among the 25 %); val and test are the same in every cell.

Encoders are shared across cells to keep the grid affordable on 2 cores: one public encoder (5 other
synthetic hospitals, synth seed 50, supervised, no DP: public data), and per data seed and DP
setting one federated SSL and one cross-modal encoder, pretrained on that federation's sites
(labels unused). Under DP the pretraining runs under the eps 4 preset and the fine-tuning under eps
8 on fresh ledgers, so the cell's patients have spent pretrain + fine-tune epsilon (both recorded).

The goal (issue 14): with 10 % labels, pretraining recovers >= 90 % of the full-label AUC (random init,
fine-tuned, 100 % labels, same DP setting).

    python bench/bench_pretrain.py [--arms random,public,ssl,crossmodal] [--finetune all,heads]
        [--fractions 0.1,0.25,1] [--epsilons none,8] [--seeds 0,1,2] [--out runs/bench-pretrain]
        [--task sarcopenia|osteoporosis_chest|osteoporosis_hand|vertebral_fracture_binary] [--mix image:1.5:0.7] [--unlabelled K] [--repeats R]

``--task`` writes that task's synthetic federation (simulation.generators) and trains its model (TASKS:
wavelet_fusion for the chest task, segclass for the hand task, fracture3d on CT; JSON bench/results/bench_pretrain_<task>.json).
``--mix NAME:IMAGE:CLINICAL`` runs the grid on another generator mix (``synth.image_signal`` /
``synth.clinical_signal``, as bench/bench_quality.py's mixes; the public hospitals follow the same mix), into
bench/results/bench_pretrain[_<task>]_mix-<NAME>.json; without it the generator's defaults (1:1).
``--unlabelled K`` gives each site K unlabelled patients per labelled one (the labelled cohort keeps the
generator's size; pretraining sees all, fine-tuning and val/test only the labelled), into ``..._unlabelled-K.json``.

``--repeats R`` fine-tunes each cell R times from the same encoder on the same federation. Under DP a fine-tune
with a few labelled patients per site is a lottery of its own (the site-secret noise and batch order): one
DP-pretrained encoder's 10 %-label AUC ranged 0.40-0.83 over 6 repeats (random init's 0.57-0.70), so the
table's mean ± SD is over every cell (seeds x repeats) and its cell counts say how many.

Each finished cell is appended to bench/results/bench_pretrain.json at once (a partial grid is a
result); a rerun skips the cells already there.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.inprocess_grid: the round loop without Ray

import numpy as np
import torch
from rich.console import Console

from shared.config import compose

RESULTS = Path(__file__).resolve().parent / "results"
# 3 sites of 180/140/100 patients (108/84/60 train), 32x32 inputs, 3 rounds x 2 local epochs: small enough
# for a few dozen cells on the loaded 2-core machine
FEDERATION = ["num_sites=3", "rounds=3", "federation.local_epochs=2", "task.image_size=[32,32]", "synth.image_size=64"]
MODEL = ["model=mmcl", "model.aux_loss=prototype"]  # the DP presets' aux loss in every cell: one model with and without DP
# --task: the task and its model, with the DP presets' per-sample aux loss in every cell (segclass: its segmentation loss)
TASKS = {"sarcopenia": ([], ["model=mmcl", "model.aux_loss=prototype"]),
         "osteoporosis_chest": (["task=osteoporosis_chest"], ["model=wavelet_fusion", "model.aux_loss=prototype"]),
         "osteoporosis_hand": (["task=osteoporosis_hand"], ["model=segclass"]),
         # CT, screening (Genant grade >= 1): the task's 32^3 box, fracture-enriched sites as in bench_ct --quality,
         # fewer patients than the 2D grids (3D steps cost ~10x); SupCon is in-batch, so the prototype aux everywhere
         "vertebral_fracture_binary": (["task=vertebral_fracture_binary", "task.image_size=[32,32,32]",
                                        "synth.patients_per_site=[120,100,80]", "synth.prevalence=[0.5,0.45,0.55]"],
                                       ["model=fracture3d", "model.aux_loss=prototype"])}


def set_mix(mix: str) -> str:
    """``NAME:IMAGE:CLINICAL`` -> the generator's signal weights in every federation of the grid; returns NAME."""
    try:
        name, image, clinical = mix.split(":")
        image_w, clinical_w = float(image), float(clinical)
    except ValueError:
        raise SystemExit(f"--mix '{mix}': give NAME:IMAGE_SIGNAL:CLINICAL_SIGNAL, e.g. image:1.5:0.7") from None
    FEDERATION[:] = [o for o in FEDERATION if not o.startswith(("synth.image_signal=", "synth.clinical_signal="))] + [
        f"synth.image_signal={image_w}", f"synth.clinical_signal={clinical_w}"]
    return name


def set_unlabelled(k: int) -> str:
    """Each site also holds ``k`` unlabelled patients per labelled one (``synth.unlabelled_fraction``), as
    hospitals do: pretraining sees them, supervised training and val/test do not (shared.sitedata.site_splits).
    Returns the JSON stem's suffix."""
    base = compose(FEDERATION).synth.patients_per_site
    FEDERATION[:] = [o for o in FEDERATION if not o.startswith(("synth.patients_per_site=", "synth.unlabelled_fraction="))] + [
        f"synth.patients_per_site=[{','.join(str(n * (1 + k)) for n in base)}]", f"synth.unlabelled_fraction={k / (1 + k)}"]
    return f"_unlabelled-{k}"


def set_task(name: str) -> None:
    """Point the grid at another task (its synthetic generator, its model); sarcopenia is the default."""
    task, model = TASKS[name]
    keys = {o.split("=", 1)[0] for o in task}
    FEDERATION[:] = [o for o in FEDERATION if o.split("=", 1)[0] not in keys] + task
    MODEL[:] = model


PRESETS = {None: [], 8.0: ["privacy=eps8"]}
PRETRAIN_DP = ["privacy=eps4"]  # a DP fine-tuning cell's encoder was pretrained on the same patients under eps 4
PRETRAIN_ROUNDS = ["rounds=3"]
# federated arms -> the pretraining objective: ssl is the default per-sample form (SimSiam + the public bank's
# VICReg variance term, pretrain.public_variance), ssl-simsiam SimSiam alone (which collapses), ssl-public the views
# against the public image bank (shared.ssl)
OBJECTIVES = {"ssl": ["pretrain=ssl"], "ssl-simsiam": ["pretrain=ssl", "pretrain.public_variance=0"],
              "ssl-public": ["pretrain=ssl", "pretrain.ssl_loss=public", "pretrain.public_variance=0"],
              "crossmodal": ["pretrain=crossmodal"],
              # the variance weight chosen under DP on tuning federations with 4 unlabelled patients per labelled one
              # (bench_pretrain_tune.py --unlabelled 4 --weights 0.3,1,3,10 --epsilons 8)
              "ssl-var3": ["pretrain=ssl", "pretrain.public_variance=3"],
              # DP-SGD's lr for pretraining chosen under DP on the same tuning federations (lr 0.01 / 0.03 / the
              # preset's 0.1): at 0.1 the noise random-walks the weights of the convolutions that a normalisation
              # follows (no gradient restores their scale) and the feature maps grow 30-100,000x
              "ssl-lr0.03": ["pretrain=ssl", "privacy.lr=0.03"], "ssl-lr0.01": ["pretrain=ssl", "privacy.lr=0.01"],
              # continued pretraining: the public encoder (the `public` arm's) adapted by federated SSL on the sites'
              # own patients under DP, at the lower lr so the noise does not walk it away from the public weights
              "public+ssl": ["pretrain=ssl", "privacy.lr=0.01"],
              # the batch chosen under DP with the lr on the same tuning federations (bench_pretrain_lr.py --batches
              # 128,256): at one epsilon a larger batch has less noise on the mean gradient and takes fewer steps
              "ssl-b256": ["pretrain=ssl", "privacy.batch_size=256"]}
START_FROM_PUBLIC = {"public+ssl"}  # arms whose federated pretraining starts from the public encoder


def write_sites(root: Path, seed: int) -> Path:
    from simulation.generators import write_federation

    sites = root / f"sites-seed{seed}"
    if not (sites / "oracle.csv").is_file():
        write_federation(compose(FEDERATION + [f"seed={seed}", f"data_root={sites}"]))
        _warm(sites)
    return sites


def _warm(sites: Path) -> None:
    """Decode every site once into its (content-keyed) preprocessing cache, which each cell's copy takes along."""
    from client.site import list_sites
    from shared.sitedata import load_site

    task = compose(FEDERATION).task
    for folder in list_sites(sites):
        load_site(folder, task, labelled_only=False)


def _fresh(sites: Path, work: Path) -> Path:
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(sites, work / "sites")  # no ledger carries over between cells
    return work / "sites"


def _epsilon_max(folders: list[Path], delta: float, accountant: str) -> float:
    from client.ledger import PrivacyLedger
    from client.privacy import epsilon_of

    spent = [epsilon_of(led.history, delta, accountant) if (led := PrivacyLedger.load(f)).history else 0.0 for f in folders]
    return max(spent, default=0.0)


def run_cell(sites: Path, work: Path, overrides: list[str]) -> dict:
    """One federation in process on a fresh copy of ``sites``: pooled test AUC, oracle, epsilon spent."""
    from client.site import list_sites
    from server.federation import run_federation
    from simulation.evaluation import load_federation, load_screener, pooled_test_metrics
    from tests.inprocess_grid import InProcessGrid

    data = _fresh(sites, work)
    cfg = compose(FEDERATION + overrides + [f"data_root={data}", f"run_dir={work / 'run'}"])
    folders = list_sites(cfg.data_root)
    start = time.perf_counter()
    arrays, _ = run_federation(InProcessGrid({100 + i: {"partition-id": i} for i in range(len(folders))}), cfg, work / "run")
    pooled = pooled_test_metrics(load_screener(cfg, arrays.to_torch_state_dict()), cfg, load_federation(cfg, folders))
    return {"test_auc": pooled["auc"], "oracle_auc": pooled["oracle_auc"],
            "epsilon_max": _epsilon_max(folders, cfg.privacy.delta, cfg.privacy.accountant),
            "seconds": time.perf_counter() - start}


def public_encoder(out: Path) -> tuple[Path, float]:
    """`fedmsk pretrain-public` on 5 other synthetic hospitals (synth seed 50): the data treated as public."""
    from simulation.pretrain_public import WEIGHTS, pretrain_public

    weights = out / "public" / WEIGHTS
    if not weights.is_file():
        public = out / "public-sites"
        if not (public / "oracle.csv").is_file():
            from simulation.generators import write_federation

            write_federation(compose(FEDERATION + ["num_sites=5", "seed=50", f"data_root={public}"]))
            _warm(public)
        pretrain_public(compose(FEDERATION + MODEL + ["num_sites=5", "seed=50", f"data_root={public}",
                                                      f"run_dir={weights.parent}"]), Console(quiet=True))
    return weights, 0.0


def federated_encoder(out: Path, objective: str, seed: int, dp: bool, start: list[str] = ()) -> tuple[Path, float]:
    """`fedmsk pretrain` (OBJECTIVES[objective]) on this seed's federation, labels unused; under DP at eps 4."""
    from client.site import list_sites
    from simulation.pretrain_fed import run_federated_pretrain
    from tests.inprocess_grid import InProcessGrid

    work = out / f"{objective}-seed{seed}-{'dp' if dp else 'nodp'}"
    done = work / "done.json"
    if done.is_file():
        meta = json.loads(done.read_text())
        return Path(meta["weights"]), meta["epsilon_max"]
    data = _fresh(write_sites(out, seed), work / "data")
    # ssl's public_variance comes from its preset, which picks the weight tuned for this DP setting
    # (bench/bench_pretrain_tune.py; PRETRAIN_DP turns privacy on)
    cfg = compose(FEDERATION + MODEL + PRETRAIN_ROUNDS + OBJECTIVES[objective] + [*start, f"seed={seed}", f"data_root={data}",
                                                                                 f"run_dir={work / 'run'}", *(PRETRAIN_DP if dp else [])])
    folders = list_sites(cfg.data_root)
    weights = run_federated_pretrain(cfg, InProcessGrid({100 + i: {"partition-id": i} for i in range(len(folders))}),
                                     Console(quiet=True))
    eps = _epsilon_max(folders, cfg.privacy.delta, cfg.privacy.accountant) if dp else 0.0
    done.write_text(json.dumps({"weights": str(weights), "epsilon_max": eps}))
    return weights, eps


def encoder(out: Path, arm: str, seed: int, dp: bool) -> tuple[Path | None, float]:
    if arm == "random":
        return None, 0.0
    if arm == "public":
        return public_encoder(out)
    if arm not in START_FROM_PUBLIC:
        return federated_encoder(out, arm, seed, dp)
    public = public_encoder(out)[0]
    adapted, eps = federated_encoder(out, arm, seed, dp, [f"model.pretrained_path={public}"])
    # the public model with its encoders replaced by the adapted ones: the heads the `public` arm fine-tunes from
    # (trained on the public labels) stay, so the two arms differ in the encoders alone
    merged = adapted.with_name("public-heads+" + adapted.name)
    if not merged.is_file():
        torch.save(torch.load(public, weights_only=True) | torch.load(adapted, weights_only=True), merged)
    return merged, eps


def grid(out: Path, arms: list[str], finetunes: list[str], fractions: list[float], epsilons: list[float | None],
         seeds: list[int], path: Path, report: dict, console: Console, repeats: int = 1) -> None:
    """Every cell ``repeats`` times, all seeds of a setting together; appended to the JSON as it finishes.

    A repeat fine-tunes the same encoder on the same federation again: under DP its noise (site-secret) and the
    sites' batch order differ, which with a few labelled patients per site moves the AUC by 0.1-0.3."""
    cells = report.setdefault("cells", [])
    done = {(c["arm"], c["finetune"], c["label_fraction"], c["epsilon"], c["seed"], c.get("repeat", 0)) for c in cells}
    for arm in arms:
        for finetune in finetunes:
            for eps in epsilons:
                for fraction in fractions:
                    for seed, repeat in ((s, r) for r in range(repeats) for s in seeds):
                        if (arm, finetune, fraction, eps, seed, repeat) in done:
                            continue
                        try:
                            weights, pre_eps = encoder(out, arm, seed, eps is not None)
                        except Exception as exc:  # noqa: BLE001 -- an arm whose pretraining fails is reported, the grid goes on
                            console.print(f"  [red]{arm} pretraining failed[/]: {type(exc).__name__}: {exc}")
                            report.setdefault("failed", {})[f"{arm} seed {seed} dp {eps is not None}"] = f"{type(exc).__name__}: {exc}"
                            path.write_text(json.dumps(report, indent=1))
                            break
                        extra = [] if weights is None else [f"model.pretrained_path={weights}"]
                        res = run_cell(write_sites(out, seed), out / "cell",
                                       MODEL + [f"seed={seed}", f"task.label_fraction={fraction}", f"model.finetune={finetune}",
                                                *PRESETS[eps], *extra])
                        cells.append({"arm": arm, "finetune": finetune, "label_fraction": fraction, "epsilon": eps,
                                      "seed": seed, "repeat": repeat, "pretrain_epsilon_max": pre_eps, **res})
                        path.write_text(json.dumps(report, indent=1))
                        console.print(f"  {arm} {finetune} {fraction:g} eps {eps} seed {seed} repeat {repeat}: AUC {res['test_auc']:.3f} "
                                      f"({res['seconds']:.0f} s)")


def _mean_sd(values: list[float]) -> str:
    a = np.array(values)
    return f"{a.mean():.3f} ± {a.std(ddof=1) if len(a) > 1 else 0:.3f}"


def table(cells: list[dict]) -> str:
    """README table: AUC mean ± SD over the cells (seeds x repeats) per label fraction; 10 % as a share of the
    full-label reference (random init, fine-tuned, 100 % labels, same DP setting); the cell counts per fraction."""
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["arm"], c["finetune"], c["epsilon"], c["label_fraction"]), []).append(c)
    fractions = sorted({c["label_fraction"] for c in cells})
    head = " | ".join(f"{f:.0%} labels" for f in fractions)
    lines = [f"| init | trained | DP | {head} | 10 % / full-label ref. | cells | eps (pretrain + fine-tune, max) |",
             "|---|---|---|" + "---|" * len(fractions) + "---|---|---|"]
    order = {"random": 0, "public": 1, "public+ssl": 2, "ssl": 3, "ssl-var3": 4, "ssl-lr0.03": 5, "ssl-lr0.01": 6,
             "ssl-b256": 7, "ssl-simsiam": 7, "ssl-public": 8, "crossmodal": 9}
    rows = sorted({k[:3] for k in groups}, key=lambda k: (k[2] is not None, order.get(k[0], 9), k[1]))
    for arm, finetune, eps in rows:
        cols = [_mean_sd([c["test_auc"] for c in groups[(arm, finetune, eps, f)]]) if (arm, finetune, eps, f) in groups else "-"
                for f in fractions]
        ref = groups.get(("random", "all", eps, 1.0))
        low = groups.get((arm, finetune, eps, min(fractions)))
        share = f"{np.mean([c['test_auc'] for c in low]) / np.mean([c['test_auc'] for c in ref]):.0%}" if ref and low else "-"
        members = [c for k, v in groups.items() if k[:3] == (arm, finetune, eps) for c in v]
        seeds = "/".join(str(len(groups[(arm, finetune, eps, f)])) if (arm, finetune, eps, f) in groups else "0" for f in fractions)
        spent = "-" if eps is None else f"{max(c['pretrain_epsilon_max'] for c in members):.1f} + {max(c['epsilon_max'] for c in members):.1f}"
        lines.append(f"| {arm} | {'linear probe' if finetune == 'heads' else 'fine-tune'} | {'no DP' if eps is None else f'eps {eps:g}'} | "
                     + " | ".join(cols) + f" | {share} | {seeds} | {spent} |")
    oracle = np.mean([c["oracle_auc"] for c in cells])
    lines.append(f"\nOracle AUC on the same test patients: {oracle:.3f}.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", default="random,public,ssl,crossmodal")
    ap.add_argument("--finetune", default="all,heads")
    ap.add_argument("--fractions", default="0.1,0.25,1")
    ap.add_argument("--epsilons", default="none,8")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--repeats", type=int, default=1,
                    help="fine-tunes per (cell, seed) from the same encoder (cells already in the JSON count as repeat 0)")
    ap.add_argument("--out", default=None, help="work folder (encoders are reused from it; default runs/<json stem>)")
    ap.add_argument("--task", default="sarcopenia", choices=sorted(TASKS), help="the task (and its model)")
    ap.add_argument("--mix", default=None, help="NAME:IMAGE:CLINICAL generator signal weights (default: the generator's 1:1)")
    ap.add_argument("--unlabelled", type=int, default=0, metavar="K",
                    help="each site holds K unlabelled patients per labelled one (pretraining uses them); default none")
    ap.add_argument("--json", default=None, help="where the cells go (default bench/results/bench_pretrain[_<task>].json)")
    ap.add_argument("--table-only", action="store_true", help="re-render the table from the JSON")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    console = Console()
    set_task(args.task)
    stem = "bench_pretrain" if args.task == "sarcopenia" else f"bench_pretrain_{args.task}"
    if args.mix:
        stem += f"_mix-{set_mix(args.mix)}"
    if args.unlabelled:
        stem += set_unlabelled(args.unlabelled)
    path = Path(args.json or RESULTS / f"{stem}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    report = json.loads(path.read_text()) if path.exists() else {}
    report["machine"] = {"platform": platform.platform(), "torch": torch.__version__, "threads": 1}
    report["federation"] = FEDERATION + MODEL
    report["task"] = args.task
    if args.mix:
        report["mix"] = args.mix
    if args.unlabelled:
        report["unlabelled_per_labelled"] = args.unlabelled
    if not args.table_only:
        grid(Path(args.out or f"runs/{stem}").resolve(), args.arms.split(","), args.finetune.split(","),
             [float(f) for f in args.fractions.split(",")], [None if e == "none" else float(e) for e in args.epsilons.split(",")],
             [int(s) for s in args.seeds.split(",")], path, report, console, args.repeats)
    if report.get("cells"):
        report["table"] = table(report["cells"])
        console.print(report["table"])
    path.write_text(json.dumps(report, indent=1))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
