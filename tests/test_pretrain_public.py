"""`fedmsk pretrain-public` and DP fine-tuning from its weights: provenance, loading, frozen encoders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from client.app import run_train
from client.ledger import PrivacyLedger
from client.trainer import build_screener
from shared.config import compose, to_yaml
from simulation.pretrain_public import pretrain_public
from simulation.synth import write_federation

TINY = [
    "num_sites=2", "synth.patients_per_site=[40,40]", "synth.image_size=32", "task.image_size=[16,16]",
    "task.augment=false", "model.width=4", "model.embed_dim=16", "model.proj_dim=8", "model.clinical_hidden=8",
    "model.aux_loss=prototype", "model.aux_weight=0.5", "federation.local_epochs=1", "rounds=1",
]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("pretrain")
    public, private = base / "public", base / "private"
    write_federation(compose(TINY + [f"data_root={public}", "seed=50"]))  # other hospitals: the public data
    write_federation(compose(TINY + [f"data_root={private}"]))
    weights = pretrain_public(compose(TINY + [f"data_root={public}", f"run_dir={base / 'run'}", "seed=50"]))
    return weights, private


def test_pretrained_weights_load_with_their_provenance(pretrained) -> None:
    weights, _ = pretrained
    card = json.loads((weights.parent / "encoder_card.json").read_text())
    assert card["data"].startswith("public") and set(card["sites"]) == {"site_a", "site_b"}
    cfg = compose(TINY + [f"model.pretrained_path={weights}"])
    loaded = build_screener(cfg).net.state_dict()
    saved = torch.load(weights, weights_only=True)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert any(not torch.equal(v, build_screener(compose(TINY)).net.state_dict()[k]) for k, v in saved.items())


@pytest.mark.parametrize("mode", ["heads", "norm_heads"])
def test_dp_fine_tuning_keeps_the_encoders_and_the_ledger_says_what_was_public(pretrained, tmp_path, mode: str) -> None:
    weights, private = pretrained
    shutil.copytree(private, tmp_path / "sites")
    job = to_yaml(compose(TINY + [f"data_root={tmp_path / 'sites'}", f"model.pretrained_path={weights}",
                                  f"model.finetune={mode}", "privacy=eps8", "privacy.accountant=rdp"]))
    start = torch.load(weights, weights_only=True)
    initial = build_screener(compose(TINY + [f"model.pretrained_path={weights}"])).state_dict()
    _, state, metrics = run_train({"partition-id": 0}, job, initial, 1, "ft")
    assert metrics["dp"] == 1.0
    moved = {k for k, v in start.items() if v.is_floating_point() and not torch.equal(state[f"net.{k}"], v)}
    conv = [k for k in start if k.startswith("image.") and k.endswith("weight") and start[k].dim() == 4]
    assert conv and not moved & set(conv)  # the pretrained image encoder's convolutions stay as loaded
    assert any(k.startswith("classifier.") for k in moved)  # the heads trained
    norm_moved = any(k.startswith(("image.", "clinical.")) and start[k].dim() == 1 for k in moved)
    assert norm_moved == (mode == "norm_heads")
    plan = PrivacyLedger.load(tmp_path / "sites" / "site_a").plans["ft"]
    card = json.loads((weights.parent / "encoder_card.json").read_text())
    assert card["sha256"] in plan.init and f"finetune={mode}" in plan.init
