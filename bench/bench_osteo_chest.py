"""Osteoporosis from chest X-ray + clinical data: multimodal vs image-only vs clinical-only, with DeLong and McNemar.

For each generator mix and seed, one synthetic federation (``task=osteoporosis_chest``) and the
``wavelet_fusion`` model trained three ways: federated (FedAvg through fedmsk's real round loop
and ClientApp, in one process), pooled (``fedmsk central``: the same model on all training
patients) and federated under DP-SGD (``privacy=eps8``). Each trained model is scored on every
site's test patients pooled (researcher-side: simulation only) three ways, from the same
forward pass: the fused probability (multimodal), the image branch's (image-only) and the clinical
branch's (clinical-only), as the seed paper compares its image model, clinical model and their
fusion. Each output gets its own Youden threshold on the pooled validation patients. Reported:
AUC, ACC, SEN, SPC; DeLong's test of fused vs each branch's AUC; McNemar's test of fused vs each
branch for ACC, SEN and SPC; the oracle AUC (the generator's true T-score) on the same patients.

    python bench/bench_osteo_chest.py [--seeds 0,1,2] [--mixes balanced,image] [--patients 100] [--rounds 4] [overrides ...]
    python bench/bench_osteo_chest.py --table     # the table of the last run's JSON (also after an interruption)

JSON to bench/results/bench_osteo_chest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"
MIXES = {"balanced": ["synth.image_signal=1.0", "synth.clinical_signal=1.0"],
         "image": ["synth.image_signal=1.5", "synth.clinical_signal=0.7"]}
TRAININGS = {"federated": [], "pooled": [], "federated DP eps 8": ["privacy=eps8"]}
OUTPUTS = {"multimodal": "logits", "image-only": "logits_image", "clinical-only": "logits_clinical"}


@torch.no_grad()
def branch_scores(screener, cfg, federation, split: str) -> tuple[list, np.ndarray, dict[str, np.ndarray]]:
    """(site, patient) keys, labels and P(osteoporosis) of each output on ``split`` of all sites pooled."""
    from client.trainer import make_loader
    from simulation.evaluation import split_patient_ids

    screener.eval()
    keys, labels, scores = [], [], {name: [] for name in OUTPUTS}
    for folder, site, datasets in federation:
        keys += [(folder.name, pid) for pid in split_patient_ids(site, cfg, split)]
        for batch in make_loader(datasets[split], 64, shuffle=False, seed=0):
            out = screener(batch["image"], batch["clinical"])
            labels.append(batch["label"].numpy())
            for name, key in OUTPUTS.items():
                scores[name].append(torch.softmax(out[key].float(), dim=1)[:, 1].numpy())
    return keys, np.concatenate(labels), {k: np.concatenate(v) for k, v in scores.items()}


def score_model(screener, cfg, federation) -> dict:
    from shared.metrics import choose_threshold, classification_metrics, histograms_of, score_histograms
    from shared.stats import delong_test, mcnemar_decisions
    from simulation.oracle import oracle_auc

    _, y_val, val = branch_scores(screener, cfg, federation, "val")
    keys, y, test = branch_scores(screener, cfg, federation, "test")
    out: dict = {"n": int(y.size), "n_pos": int(y.sum()), "oracle_auc": oracle_auc(cfg.data_root, keys)}
    decisions = {}
    for name, s in test.items():
        threshold = choose_threshold(*histograms_of(score_histograms(y_val, val[name])))
        m = classification_metrics(y, np.stack([1 - s, s], axis=1), threshold=threshold)
        out[name] = {k: float(m[k]) for k in ("auc", "acc", "sen", "spc")} | {"threshold": threshold}
        decisions[name] = (s >= threshold).astype(int)
    for other in ("image-only", "clinical-only"):
        d = delong_test(y, test["multimodal"], test[other])
        mc = mcnemar_decisions(y, decisions["multimodal"], decisions[other])
        out[f"vs {other}"] = {"auc_diff": d.diff, "delong_p": d.p} | {
            f"mcnemar_{k}_p": r.p for k, r in mc.items()} | {f"mcnemar_{k}_bc": [r.b, r.c] for k, r in mc.items()}
    out["mix_weight_image"] = float(screener.net.mix(torch.tensor([[[1.0], [0.0]]])).item())  # w itself
    return out


def run_one(training: str, cfg, work: Path) -> dict:
    from server.federation import run_federation
    from simulation.central import central
    from simulation.evaluation import load_federation, load_screener
    from tests.inprocess_grid import InProcessGrid  # the real ClientApp, in this process (no Ray start-up)

    if training == "pooled":
        central(cfg, Console(quiet=True))
        state = torch.load(Path(cfg.run_dir) / "final_model.pt", map_location="cpu", weights_only=True)
    else:
        arrays, _ = run_federation(InProcessGrid({100 + i: {"partition-id": i} for i in range(cfg.num_sites)}), cfg,
                                   Path(cfg.run_dir))
        state = arrays.to_torch_state_dict()
    return score_model(load_screener(cfg, state), cfg, load_federation(cfg))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1])
    parser.add_argument("--mixes", type=lambda v: v.split(","), default=list(MIXES))
    parser.add_argument("--patients", type=int, default=90, help="patients per site (3 sites)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--size", type=int, default=32, help="model input size (pixels)")
    parser.add_argument("--table", action="store_true", help="only print the table of bench/results/bench_osteo_chest.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ helpers live beside bench/
    os.environ.setdefault("FEDMSK_INSECURE_DP_SEED", "bench-osteo-chest")  # repeatable site randomness: a benchmark
    from shared.config import compose
    from simulation.synth_chest import write_federation

    if args.table:  # re-print the table of the last (possibly interrupted) run from its JSON
        saved = json.loads((RESULTS / "bench_osteo_chest.json").read_text())
        print_table(summarise(saved["runs"]), argparse.Namespace(**saved["args"]))
        return
    runs: list[dict] = []
    for seed in args.seeds:  # seeds outside: an interrupted run still has every mix of its first seeds
        for mix in args.mixes:
            work = Path(tempfile.mkdtemp(prefix=f"fedmsk-osteo-chest-{mix}-{seed}-"))
            base = ["task=osteoporosis_chest", "model=wavelet_fusion", f"seed={seed}", f"data_root={work / 'fed'}",
                    "num_sites=3", f"synth.patients_per_site=[{args.patients}]", "synth.image_size=64",
                    f"task.image_size=[{args.size},{args.size}]", f"rounds={args.rounds}", "federation.local_epochs=2",
                    *MIXES[mix], *args.overrides]
            write_federation(compose(base))
            for k, (training, extra) in enumerate(TRAININGS.items()):
                cfg = compose(base + extra + [f"run_dir={work / 'runs' / f'run{k}'}"])
                torch.set_num_threads(max(1, cfg.federation.torch_threads))
                start = time.perf_counter()
                row = {"mix": mix, "seed": seed, "training": training} | run_one(training, cfg, work)
                row["seconds"] = time.perf_counter() - start
                runs.append(row)
                print(json.dumps({k: row[k] for k in ("mix", "seed", "training", "seconds")} |
                                 {o: round(row[o]["auc"], 3) for o in OUTPUTS} | {"oracle": round(row["oracle_auc"], 3)}), flush=True)
                RESULTS.mkdir(exist_ok=True)
                (RESULTS / "bench_osteo_chest.json").write_text(json.dumps(
                    {"args": vars(args), "runs": runs, "summary": summarise(runs)}, indent=1))
            shutil.rmtree(work, ignore_errors=True)
    print_table(summarise(runs), args)


def summarise(runs: list[dict]) -> list[dict]:
    """Mean and SD over seeds per (mix, training, output), 'all' pooling both mixes; p-values as median and count < 0.05."""
    rows = []
    mixes = sorted({r["mix"] for r in runs}) + (["all"] if len({r["mix"] for r in runs}) > 1 else [])
    for mix in mixes:
        for training in TRAININGS:
            group = [r for r in runs if r["training"] == training and (mix == "all" or r["mix"] == mix)]
            if not group:
                continue
            for output in OUTPUTS:
                row = {"mix": mix, "training": training, "output": output, "runs": len(group)}
                for k in ("auc", "acc", "sen", "spc"):
                    vals = [r[output][k] for r in group]
                    row[k] = [float(np.mean(vals)), float(np.std(vals))]
                if output != "multimodal":
                    vs = [r[f"vs {output}"] for r in group]
                    for k in ("delong_p", "mcnemar_acc_p", "mcnemar_sen_p", "mcnemar_spc_p"):
                        ps = [v[k] for v in vs]
                        row[k] = {"median": float(np.median(ps)), "below_0.05": int(sum(p < 0.05 for p in ps))}
                row["oracle_auc"] = float(np.mean([r["oracle_auc"] for r in group]))
                row["seconds"] = float(np.mean([r["seconds"] for r in group]))
                rows.append(row)
    return rows


def print_table(summary: list[dict], args) -> None:
    table = Table(title=f"osteoporosis_chest, 3 sites x {args.patients}, seeds {args.seeds}, {args.rounds} rounds x 2 epochs, "
                        f"{args.size}px (mean +- sd over seeds; p: median, runs < 0.05)")
    for col in ("mix", "training", "output", "AUC", "ACC", "SEN", "SPC", "DeLong p vs fused", "McNemar ACC/SEN/SPC p", "oracle AUC"):
        table.add_column(col)
    ms = lambda v: f"{v[0]:.3f} +- {v[1]:.3f}"  # noqa: E731
    pv = lambda d: f"{d['median']:.3f} ({d['below_0.05']}/{{n}})"  # noqa: E731
    for r in summary:
        p = "" if "delong_p" not in r else pv(r["delong_p"]).format(n=r["runs"])
        mc = "" if "delong_p" not in r else " / ".join(f"{r[k]['median']:.2f}" for k in ("mcnemar_acc_p", "mcnemar_sen_p", "mcnemar_spc_p"))
        table.add_row(r["mix"], r["training"], r["output"], ms(r["auc"]), ms(r["acc"]), ms(r["sen"]), ms(r["spc"]), p, mc,
                      f"{r['oracle_auc']:.3f}")
    Console(width=220).print(table)


if __name__ == "__main__":
    main()
