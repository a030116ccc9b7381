"""Where a model's starting weights came from: the card `fedmsk pretrain-public` writes beside them.

The model card of a run and each site's privacy ledger repeat it, so a reader knows which data
were public (the pretraining sites) and which were private (each hospital's training split).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

CARD = "encoder_card.json"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def provenance(pretrained_path: str | None) -> dict[str, Any] | None:
    """The card of the public weights a model starts from (None for random init), hash checked."""
    if not pretrained_path:
        return None
    weights = Path(pretrained_path)
    digest = sha256_of(weights) if weights.is_file() else None
    card_path = weights.with_name(CARD)
    if not card_path.is_file():
        return {"weights": str(weights), "sha256": digest, "data": "unknown: no encoder_card.json beside the weights"}
    card = json.loads(card_path.read_text())
    card["sha256_matches"] = card.get("sha256") == digest
    return card


def init_line(pretrained_path: str | None, finetune: str) -> str:
    """One line for a ledger: random init, or the public weights (hash) and what was fine-tuned."""
    card = provenance(pretrained_path)
    if card is None:
        return "random init"
    return f"public weights sha256={card.get('sha256')} ({card.get('data', '')}), finetune={finetune}"


WEIGHTS = "encoder.pt"  # what `fedmsk pretrain` writes beside CARD (the same names as `fedmsk pretrain-public`)


def write_pretrained(cfg: Any, run_dir: Path, state: dict[str, Any], rows: list[dict[str, Any]], code: dict[str, Any]) -> Path:
    """Keep the encoders of a federated pretraining run's final model: ``encoder.pt`` + its card.

    ``state`` is the final global Screener state (``net.image.*``, ``net.clinical.*``, heads);
    only the encoders the objective trained are kept, under the task models' own names, so
    ``model.pretrained_path`` loads them into any task model with the same encoder shapes
    (shared.models.encoder_state). ``rows`` are the run's metrics rows (what the sites released:
    patients trained on, epsilon, validation loss). The card says the data were private (each
    site's own patients) and how much epsilon each site spent, for the composition a fine-tuned
    model's card states (``compose_privacy``).
    """
    import torch

    from shared.atomic import atomic_write_bytes, atomic_write_text
    from shared.ssl import feature_scale, objective_label, uses_image_bank

    keep = ("image",) if cfg.pretrain.objective == "ssl" else ("image", "clinical")
    encoders = {k.removeprefix("net."): v.detach().cpu() for k, v in state.items() if k.split(".")[:2][-1] in keep
                and k.startswith("net.")}
    if not encoders:
        raise RuntimeError(f"the final model of {run_dir} holds no encoder weights ({', '.join(keep)}); nothing to keep")
    import io

    buf = io.BytesIO()
    torch.save(encoders, buf)
    weights = run_dir / WEIGHTS
    atomic_write_bytes(weights, buf.getvalue())
    trains = [r for r in rows if r["phase"] == "train" and r["site"] != "global"]
    if not trains:
        raise RuntimeError(f"pretraining run {run_dir}: no site trained, so there are no pretrained weights to keep")
    sites: dict[str, dict[str, Any]] = {}
    for r in trains:
        s = sites.setdefault(r["site"], {"patients": 0, "rounds_trained": 0, "dp": False, "epsilon": None, "delta": None,
                                         "ledger_epsilon": None})
        s["patients"] = int(r.get("num-examples") or 0)
        s["rounds_trained"] += 1
        if r.get("dp"):
            s["dp"], s["delta"] = True, r.get("delta")
            s["epsilon"] = max(s["epsilon"] or 0.0, r.get("epsilon_run") or 0.0)
            s["ledger_epsilon"] = max(s["ledger_epsilon"] or 0.0, r.get("epsilon") or 0.0)
    p = cfg.pretrain
    card = {
        "weights": WEIGHTS,
        "sha256": sha256_of(weights),
        "kind": "federated pretraining (fedmsk pretrain)",
        "objective": p.objective,
        "objective_label": objective_label(cfg),
        "loss": p.ssl_loss if p.objective == "ssl" else f"infonce, negatives={p.negatives}",
        "public_bank": ({"images": p.bank_size, "source": p.bank_root or f"synthetic: the task's generator at seed {p.bank_seed}",
                         "negatives": p.objective == "ssl" and p.ssl_loss == "public", "public_variance": p.public_variance}
                        if uses_image_bank(cfg) else None),  # the public images the objective embeds
        "encoders": sorted({k.split(".", 1)[0] for k in encoders}),
        "data": "private: each site's own patients (labelled or not, never its validation or test patients), "
                "federated with FedAvg; no data left a site",
        "data_root": str(cfg.data_root),
        "sites": sites,
        "epsilon_note": "epsilon per site: what this pretraining run spent there on its own (its steps, by the "
                        "site's accountant; null: the site trained without DP), at most pretrain.epsilon; "
                        "ledger_epsilon: the site's total over all its runs after it. A model fine-tuned from "
                        "these weights adds epsilon to its own (sequential composition)",
        "epsilon_cap": p.epsilon,
        "rounds": cfg.rounds,
        "local_epochs": cfg.federation.local_epochs,
        "strategy": cfg.strategy.name,
        "model": cfg.model.name,
        "task": cfg.task.name,
        "val_loss_by_round": [(r["round"], r.get("loss")) for r in rows
                              if r["phase"] == "evaluate" and r["split"] == "val" and r["site"] == "global"],
        # the objective's loss cannot show an encoder whose feature maps DP noise inflated; this can (and warns)
        "feature_scale": feature_scale(cfg, encoders),
        "code": code,
    }
    atomic_write_text(run_dir / CARD, json.dumps(card, indent=2))
    return weights


def compose_privacy(pretrained: dict[str, Any] | None, finetune: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Per site, the epsilon of the pretraining plus that of the fine-tuning (sequential composition).

    A model fine-tuned from federated-pretrained weights depends on a site's patients through
    both runs, so its guarantee at that site is the composition of the two: by basic sequential
    composition, epsilons add and deltas add. The pretraining figure is that run's own spend
    (the card's ``epsilon``); ``finetune`` is site -> {"epsilon", "delta"} as this run's sites
    reported them (None: no DP), which is the site's ledger total: when that ledger also booked
    the pretraining (a deployment site), the figure already includes it and the sum counts it
    twice. The sum is therefore an upper bound; the site's ledger (`fedmsk privacy`) holds the
    tighter, accountant-composed figure. None when the weights are not from a federated
    pretraining run (public weights spend no private budget).
    """
    if not pretrained or "objective" not in pretrained or not isinstance(pretrained.get("sites"), dict):
        return None
    pre = pretrained["sites"]
    out: dict[str, dict[str, Any]] = {}
    for site in sorted(set(pre) | set(finetune)):
        p, f = pre.get(site, {}), finetune.get(site, {})
        unbounded = [what for what, runs, row in (("pretraining", pre, p), ("fine-tuning", finetune, f))
                     if site in runs and row.get("epsilon") is None]
        out[site] = {
            "pretraining_epsilon": p.get("epsilon"), "finetuning_epsilon": f.get("epsilon"),
            "epsilon_total": None if unbounded else (p.get("epsilon") or 0.0) + (f.get("epsilon") or 0.0),
            "delta_total": None if unbounded else (p.get("delta") or 0.0) + (f.get("delta") or 0.0),
        }
        if unbounded:
            out[site]["note"] = f"{' and '.join(unbounded)} ran here without DP: no epsilon bound holds for this site"
    return {
        "rule": "sequential composition: epsilon_total = pretraining + fine-tuning epsilon of the site, deltas added "
                "(an upper bound; the site's ledger composes both runs more tightly when it booked both)",
        "pretraining_objective": pretrained.get("objective_label"),
        "sites": out,
    }


def finetune_privacy(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """site -> {"epsilon", "delta"} of a run from its train rows (the sites' reports); None values: no DP."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["phase"] != "train" or r["site"] == "global":
            continue
        s = out.setdefault(r["site"], {"epsilon": None, "delta": None})
        if r.get("dp"):
            s["epsilon"], s["delta"] = max(s["epsilon"] or 0.0, r.get("epsilon") or 0.0), r.get("delta")
    return out
