"""Does a `fedmsk pretrain` encoder see anything? A frozen-encoder linear probe and a collapse check.

    python bench/bench_pretrain_probe.py <data_root> <out_dir> pretrain=ssl rounds=5 [overrides]

Federates the objective over the site folders of ``data_root`` through the in-process grid (the real
ServerApp/ClientApp, no Ray start-up), then, for random init and for the pretrained weights, fits a
scikit-learn logistic regression on the frozen ``image_only`` embeddings (``z_image``) of every site's
labelled training patients and scores it on all sites' test patients pooled (researcher-side, exact
AUC). "spread" is the mean per-dimension SD of the L2-normalised test embeddings x sqrt(dim): near 0
means every patient sits at one point (collapse), but a large offset common to every patient also
shrinks it; "effective_rank" (exp of the entropy of the centred embeddings' singular-value shares,
Roy & Vetterli 2007) counts the directions the patients differ along: near 1, dimensional collapse. One JSON line per run is appended to
bench/results/bench_pretrain_probe.jsonl. The fine-tuning table at 10/25/100 % labels is
bench/bench_pretrain.py's.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def embeddings(cfg, sites, split: str) -> tuple[np.ndarray, np.ndarray]:
    from client.trainer import build_screener
    from shared.sitedata import load_site, make_datasets

    net = build_screener(cfg).net.eval()
    feats, labels = [], []
    with torch.no_grad():
        for folder in sites:
            data = make_datasets(load_site(folder, cfg.task), cfg.task, cfg.seed)[split]
            for i in range(len(data)):
                feats.append(net(data[i]["image"][None], data[i]["clinical"][None])["z_image"][0].numpy())
                labels.append(int(data[i]["label"]))
    return np.array(feats), np.array(labels)


def main(argv: list[str]) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    import shared.losses, shared.models, shared.ssl  # noqa: F401 -- their config checks run at compose
    from client.site import list_sites
    from shared.config import compose
    from simulation.pretrain_fed import run_federated_pretrain
    from tests.inprocess_grid import InProcessGrid

    torch.set_num_threads(1)
    data, out, overrides = argv[0], argv[1], argv[2:]
    base = [f"data_root={data}", "federation.local_epochs=1"]
    sites = list_sites(data)
    start = time.time()
    weights = run_federated_pretrain(compose(base + overrides + [f"run_dir={out}"]),
                                     InProcessGrid({100 + i: {"partition-id": i} for i in range(len(sites))}))
    result: dict = {"overrides": overrides, "pretrain_s": round(time.time() - start)}
    for name, extra in (("random", []), ("pretrained", [f"model.pretrained_path={weights}"])):
        cfg = compose(base + ["model=image_only"] + [o for o in overrides if o.startswith(("model.", "task.", "seed="))] + extra)
        x_train, y_train = embeddings(cfg, sites, "train")
        x_test, y_test = embeddings(cfg, sites, "test")
        mean, sd = x_train.mean(0), x_train.std(0) + 1e-6
        probe = LogisticRegression(max_iter=2000).fit((x_train - mean) / sd, y_train)
        auc = roc_auc_score(y_test, probe.predict_proba((x_test - mean) / sd)[:, 1])
        unit = x_test / np.linalg.norm(x_test, axis=1, keepdims=True)
        power = np.linalg.svd(x_test - x_test.mean(0), compute_uv=False) ** 2
        share = power / power.sum()
        result[name] = {"probe_auc": round(float(auc), 3), "spread": round(float(unit.std(0).mean() * np.sqrt(unit.shape[1])), 3),
                        "effective_rank": round(float(np.exp(-(share * np.log(share + 1e-12)).sum())), 2)}
    card = json.loads((weights.parent / "encoder_card.json").read_text())
    result |= {"sites": card["sites"], "val_loss_by_round": card["val_loss_by_round"]}
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    with (results / "bench_pretrain_probe.jsonl").open("a") as fh:
        fh.write(json.dumps(result) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
