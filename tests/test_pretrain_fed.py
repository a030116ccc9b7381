"""`fedmsk pretrain`: per-sample objectives (and the in-batch one that is not), the weights a task model
loads, the ledger's pretraining entries, the composed epsilon of a fine-tuned model, unlabelled patients."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from opacus import GradSampleModule

from client.ledger import PrivacyLedger
from client.privacy import budget_report
from client.pretrain import pretrain_datasets
from client.trainer import build_screener
from server.federation import run_federation
from shared.config import ConfigError, compose
from shared.provenance import compose_privacy
from shared.ssl import SCALE_WARN, feature_scale, uses_image_bank
from shared.sitedata import load_site, make_datasets
from simulation.pretrain_fed import run_federated_pretrain
from simulation.synth import write_federation
from tests.inprocess_grid import InProcessGrid

SMALL = ["task.image_size=[16,16]", "model.width=4", "model.embed_dim=16", "model.proj_dim=8", "model.clinical_hidden=8",
         "pretrain.proj_dim=8"]
TINY = SMALL + ["num_sites=2", "synth.patients_per_site=[36,34]", "synth.image_size=32", "task.augment=false",
                "federation.local_epochs=1", "rounds=1", "federation.batch_size=8"]
DP = ["privacy=eps8", "privacy.accountant=rdp", "privacy.batch_size=8"]
UNLABELLED = 6  # patients per site whose label is blanked in clinical.csv
OBJECTIVES_DP = {"ssl": ["pretrain=ssl"], "ssl_simsiam": ["pretrain=ssl", "pretrain.public_variance=0"],
                 "ssl_public": ["pretrain=ssl", "pretrain.ssl_loss=public", "pretrain.public_variance=0"],
                 "ssl_bank": ["pretrain=ssl", "pretrain.ssl_loss=bank"], "crossmodal": ["pretrain=crossmodal"]}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread, as each simulated site runs (federation.torch_threads): a small model's per-sample
    gradients take seconds instead of a fraction of one when the busy machine's threads oversubscribe."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _nodes(n: int = 2) -> dict[int, dict]:
    return {100 + i: {"partition-id": i} for i in range(n)}


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pretrain_fed") / "sites"
    cfg = compose(TINY + [f"data_root={root}"])
    write_federation(cfg)
    for site in sorted(p for p in root.iterdir() if (p / "clinical.csv").is_file()):  # hospitals hold unlabelled patients
        rows = list(csv.DictReader((site / "clinical.csv").open()))
        for row in rows[:UNLABELLED]:
            row[cfg.task.label_column] = ""
        with (site / "clinical.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return root


def _copy(sites: Path, dst: Path) -> Path:
    return shutil.copytree(sites, dst, ignore=shutil.ignore_patterns(".fedmsk"))  # a fresh ledger per test


# ---------------------------------------------------------------------------- decoupling
def _per_sample_grads(screener, image: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
    """[B, n_params] per-sample gradients of the objective's loss, by Opacus' hooks (what DP-SGD clips)."""
    gsm = GradSampleModule(screener)
    torch.manual_seed(0)  # the same dropout masks for both batches
    loss, _ = screener.criterion(gsm(image, clinical), torch.full((image.shape[0],), -1))
    loss.backward()
    rows = torch.cat([p.grad_sample.reshape(image.shape[0], -1) for p in screener.parameters() if p.requires_grad], dim=1)
    gsm._close()
    return rows


def _replaced_patient_effect(overrides: list[str]) -> tuple[float, float, float]:
    """(max change of the other patients' gradients, of patient 3's, size of patient 0's) when patient 3 changes."""
    cfg = compose(SMALL + overrides)
    screener = build_screener(cfg)
    screener.train()
    g = torch.Generator().manual_seed(1)
    if uses_image_bank(cfg):  # ssl_loss=public: the negatives are the encoder's embeddings of these public images
        screener.net.set_bank(torch.rand(6, 1, 16, 16, generator=g))
    channels = 2 if cfg.pretrain.objective == "ssl" else 1
    image, clinical = torch.rand(5, channels, 16, 16, generator=g), torch.randn(5, 5, generator=g)
    before = _per_sample_grads(screener, image, clinical)
    image[3], clinical[3] = torch.rand(channels, 16, 16, generator=g), torch.randn(5, generator=g)
    after = _per_sample_grads(screener, image, clinical)
    others = [0, 1, 2, 4]
    return (float((after[others] - before[others]).abs().max()), float((after[3] - before[3]).abs().max()),
            float(before[0].abs().max()))


@pytest.mark.parametrize("objective", sorted(OBJECTIVES_DP))
def test_each_dp_objective_is_per_sample(objective: str) -> None:
    others, replaced, size = _replaced_patient_effect(OBJECTIVES_DP[objective])
    assert size > 1e-4 and replaced > 1e-4  # the gradients are real and patient 3's own did change
    assert others < 1e-6  # nobody else's moved: DP-SGD's per-patient clipping bounds each patient


def test_the_public_bank_objective_scores_collapse_at_chance() -> None:
    """An encoder that maps every image to one point maps the public images there too: the loss is log(K + 1), chance
    level; the same encoder before collapsing, whose patient's views agree more with each other than with the public
    images, scores lower. So collapse is no optimum of the public-bank loss (SimSiam's optimum includes it)."""
    g = torch.Generator().manual_seed(2)
    view = torch.rand(4, 1, 16, 16, generator=g)
    image = torch.cat([view, view], dim=1)  # two identical views: the positive pair agrees fully
    screener = build_screener(compose(SMALL + OBJECTIVES_DP["ssl_public"] + ["pretrain.recon_weight=0"])).eval()
    screener.net.set_bank(torch.rand(6, 1, 16, 16, generator=g))
    with torch.no_grad():
        spread, _ = screener.criterion(screener(image, torch.zeros(4, 5)), torch.full((4,), -1))
        screener.net.projector.net[-1].weight.zero_()  # collapse: the projection is its bias whatever the image
        collapsed, _ = screener.criterion(screener(image, torch.zeros(4, 5)), torch.full((4,), -1))
    assert float(collapsed) == pytest.approx(math.log(6 + 1), abs=1e-4)
    assert float(spread) < float(collapsed) - 0.1


def test_the_public_variance_gradient_is_added_outside_the_clipped_per_sample_gradients() -> None:
    """pretrain.public_variance: the VICReg term of the public bank's embeddings adds exactly its own gradient to the
    update and leaves Opacus' per-sample gradients (what DP-SGD clips and noises) as the patients' loss made them:
    its K public images never count as patients, and no patient's gradient carries it."""
    from client.pretrain import PublicVariance

    cfg = compose(SMALL + ["pretrain=ssl", "pretrain.public_variance=0.5"])
    screener = build_screener(cfg)
    screener.train()
    g = torch.Generator().manual_seed(5)
    screener.net.set_bank(torch.rand(6, 1, 16, 16, generator=g))
    params = [p for p in screener.parameters() if p.requires_grad]
    expected = torch.autograd.grad(0.5 * screener.net.public_variance_loss(), params, allow_unused=True)
    gsm = GradSampleModule(screener)
    torch.manual_seed(0)
    loss, _ = screener.criterion(gsm(torch.rand(4, 2, 16, 16, generator=g), torch.zeros(4, 5)), torch.full((4,), -1))
    loss.backward()
    samples = [p.grad_sample.clone() for p in params]
    grads = [p.grad.clone() for p in params]
    PublicVariance(screener, 0.5).add_gradient(gsm)
    assert all(torch.equal(p.grad_sample, s) for p, s in zip(params, samples))  # the clipped quantity is untouched
    added = [p.grad - before for p, before in zip(params, grads)]
    assert all(torch.allclose(a, e if e is not None else torch.zeros_like(a), atol=1e-6) for a, e in zip(added, expected))
    assert any(e is not None and e.abs().max() > 1e-4 for e in expected)  # the term has a real gradient
    gsm._close()


def test_a_forward_without_the_public_bank_is_refused() -> None:
    screener = build_screener(compose(SMALL + OBJECTIVES_DP["ssl_public"]))
    with pytest.raises(RuntimeError, match="public image bank"):
        screener(torch.rand(2, 2, 16, 16), torch.zeros(2, 5))


def test_in_batch_crossmodal_couples_the_batch_and_is_refused_under_dp() -> None:
    others, _, _ = _replaced_patient_effect(["pretrain=crossmodal", "pretrain.negatives=batch"])
    assert others > 1e-4  # the other patients' gradients moved: the decoupling fails
    with pytest.raises(ConfigError, match="pretrain.negatives=batch"):
        compose(SMALL + ["pretrain=crossmodal", "pretrain.negatives=batch"] + DP)


def test_a_site_whose_own_policy_turns_dp_on_refuses_in_batch_pretraining(sites: Path, tmp_path: Path) -> None:
    from client.app import run_train

    root = _copy(sites, tmp_path / "sites")
    policy = tmp_path / "privacy.yaml"
    policy.write_text("enabled: true\ntarget_epsilon: 8.0\ndelta: 1.0e-5\nmax_grad_norm: 1.0\naccountant: rdp\n")
    cfg = compose(TINY + [f"data_root={root}", "pretrain=crossmodal", "pretrain.negatives=batch"])
    from shared.config import to_yaml

    with pytest.raises(ConfigError, match="pretrain.negatives=batch"):
        run_train({"partition-id": 0, "privacy-config": str(policy)}, to_yaml(cfg), build_screener(cfg).state_dict(), 1, "x")
    assert not PrivacyLedger.load(root / "site_a").rounds  # refused before any step


def test_a_dp_pretraining_job_trains_at_its_own_batch_and_lr_unless_the_site_policy_sets_them(sites: Path, tmp_path: Path) -> None:
    """pretrain.dp_batch_size / dp_lr replace the privacy preset's for a pretraining job under DP, and reach the
    accountant (the ledger's sample rate); a supervised job, a job without DP and a site's own settings keep theirs."""
    from client.app import run_train
    from client.pretrain import pretrain_training
    from client.privacy import dp_training, load_policy_file
    from shared.config import to_yaml

    own = ["pretrain.dp_batch_size=16", "pretrain.dp_lr=0.02"]
    cfg = compose(TINY + ["pretrain=ssl", *DP, *own])
    dp = pretrain_training(cfg.federation, cfg, {}, dp=True)
    assert (dp.batch_size, dp.lr) == (16, 0.02) and dp.local_epochs == cfg.federation.local_epochs
    assert pretrain_training(cfg.federation, cfg, {}, dp=False) == cfg.federation
    supervised = compose(TINY + DP + own)  # pretrain=none: the fields are there and do nothing
    assert pretrain_training(supervised.federation, supervised, {}, dp=True) == supervised.federation
    policy = tmp_path / "privacy.yaml"
    policy.write_text("enabled: true\ntarget_epsilon: 8.0\ndelta: 1.0e-5\nmax_grad_norm: 1.0\naccountant: rdp\nbatch_size: 4\n")
    site_fed = dp_training(cfg.federation, load_policy_file(policy))  # what run_train hands on: the site's batch 4
    mixed = pretrain_training(site_fed, cfg, {"privacy-config": str(policy)}, dp=True)
    assert (mixed.batch_size, mixed.lr) == (4, 0.02)  # the site's batch stays, the lr is the job's

    root = _copy(sites, tmp_path / "sites")
    job = compose(TINY + ["pretrain=ssl", *DP, *own, f"data_root={root}"])
    run_train({"partition-id": 0}, to_yaml(job), build_screener(job).state_dict(), 1, "pre")
    n_train = len(pretrain_datasets(str(root / "site_a"), job, job.seed, private=True)["train"])
    plan = PrivacyLedger.load(root / "site_a").plans["pre"]
    assert n_train > 16 and plan.sample_rate == 1 / math.ceil(n_train / 16)  # not the preset's batch of 8


# ---------------------------------------------------------------------------- unlabelled patients
def test_pretraining_uses_the_unlabelled_patients_supervised_training_ignores(sites: Path) -> None:
    cfg = compose(TINY + [f"data_root={sites}", "pretrain=ssl"])
    site = load_site(sites / "site_a", cfg.task, labelled_only=False)
    supervised = make_datasets(load_site(sites / "site_a", cfg.task), cfg.task, cfg.seed)
    pre = pretrain_datasets(str(sites / "site_a"), cfg, cfg.seed, private=False)
    labels = [int(pre["train"][i]["label"]) for i in range(len(pre["train"]))]
    assert labels.count(-1) == UNLABELLED == int((site.labels < 0).sum())
    assert len(pre["train"]) == len(supervised["train"]) + UNLABELLED  # every labelled training patient too
    assert all(int(supervised["train"][i]["label"]) >= 0 for i in range(len(supervised["train"])))
    assert len(pre["val"]) == len(supervised["val"]) and len(pre["test"]) == 0  # test patients never pretrain
    assert pre["train"][0]["image"].shape[0] == 2  # two views per image


# ---------------------------------------------------------------------------- the verb
@pytest.fixture(scope="module")
def dp_pretrained(sites: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both DP-safe families pretrained under DP on the same sites (one ledger each site); ssl as configured by
    default (SimSiam + the public bank's variance term, the bank drawn by the synthetic generator into each site's cache)."""
    base = tmp_path_factory.mktemp("dp_pretrained")
    root = _copy(sites, base / "sites")
    out = {}
    for name, objective in (("ssl", "ssl"), ("crossmodal", "crossmodal")):
        cfg = compose(TINY + OBJECTIVES_DP[objective] + DP + [f"data_root={root}", f"run_dir={base / name}", "rounds=2"])
        out[name] = run_federated_pretrain(cfg, grid=InProcessGrid(_nodes()))
    out["root"] = root
    return out


@pytest.mark.parametrize("objective", ["ssl", "crossmodal"])
def test_the_weights_load_into_task_models_and_change_their_features(dp_pretrained, objective: str) -> None:
    weights = dp_pretrained[objective]
    saved = torch.load(weights, weights_only=True)
    assert {k.split(".")[0] for k in saved} == ({"image"} if objective == "ssl" else {"image", "clinical"})
    g = torch.Generator().manual_seed(3)
    image, clinical = torch.rand(2, 1, 16, 16, generator=g), torch.randn(2, 5, generator=g)
    for model in ("mmcl", "image_only"):
        random = build_screener(compose(SMALL + [f"model={model}"] + [k for k in SMALL if k.startswith("model.")])).net
        loaded = build_screener(compose(SMALL + [f"model={model}", f"model.pretrained_path={weights}"])).net
        own = loaded.state_dict()
        assert all(torch.equal(own[k], v) for k, v in saved.items() if k in own)
        assert any(not torch.equal(own[k], random.state_dict()[k]) for k in saved if k.startswith("image."))
        random.eval(), loaded.eval()
        assert not torch.allclose(random(image, clinical)["z_image"], loaded(image, clinical)["z_image"], atol=1e-4)
        untouched = [k for k in own if k.startswith("classifier.")]
        assert untouched and all(torch.equal(own[k], random.state_dict()[k]) for k in untouched)  # heads: seeded init


def test_the_ssl_preset_takes_its_public_variance_per_dp_setting_and_an_override_wins() -> None:
    """configs/pretrain/ssl.yaml's public_variance was tuned without DP and under DP separately: the DP presets get
    the DP weight, and pretrain.public_variance=W replaces both (the grid's SimSiam-alone arm passes 0)."""
    plain, dp = compose(["pretrain=ssl"]).pretrain.public_variance, compose(["pretrain=ssl", *DP]).pretrain.public_variance
    assert plain > 0 and dp > 0 and plain != dp
    assert compose(["pretrain=ssl", "privacy=eps4"]).pretrain.public_variance == dp
    for extra in ([], DP):
        assert compose(["pretrain=ssl", "pretrain.public_variance=0", *extra]).pretrain.public_variance == 0.0
    assert compose(["pretrain=crossmodal", *DP]).pretrain.public_variance == 0.0


def test_the_card_and_the_ledger_record_the_private_pretraining(dp_pretrained) -> None:
    card = json.loads((dp_pretrained["ssl"].parent / "encoder_card.json").read_text())
    assert card["objective"] == "ssl" and card["data"].startswith("private") and card["rounds"] == 2
    assert card["public_bank"] == {"images": 64, "source": "synthetic: the task's generator at seed 50", "negatives": False,
                                   "public_variance": compose(["pretrain=ssl", *DP]).pretrain.public_variance}
    assert set(card["sites"]) == {"site_a", "site_b"} and "git_commit" in card["code"]
    for s in card["sites"].values():  # pretrain.epsilon=2: this run's own share of the site's budget of 8
        assert s["dp"] and s["rounds_trained"] == 2 and 0.5 < s["epsilon"] <= 2.0 * 1.001 and s["ledger_epsilon"] >= s["epsilon"] - 1e-9
    assert [r for r, _ in card["val_loss_by_round"]] == [0, 1, 2]
    scale = card["feature_scale"]  # from the weights and noise images alone: what the check reads
    assert scale["init"] > 0 and scale["final"] > 0 and "no patient data" in scale["inputs"]
    assert scale == feature_scale(compose(TINY + OBJECTIVES_DP["ssl"] + DP), torch.load(dp_pretrained["ssl"], weights_only=True))
    assert ("warning" in scale) == (scale["ratio"] > SCALE_WARN)
    ledger = PrivacyLedger.load(dp_pretrained["root"] / "site_a")
    objectives = {plan.objective for plan in ledger.plans.values()}
    assert objectives == {"pretrain:ssl/simsiam", "pretrain:crossmodal/bank"}  # one plan per objective
    runs = {run for run, plan in ledger.plans.items()}
    assert {r.run_id for r in ledger.rounds} == runs and len(ledger.rounds) == 4  # 2 rounds per objective
    report = budget_report(dp_pretrained["root"] / "site_a")  # what `fedmsk privacy` lists: epsilon per run and objective
    assert {r["objective"] for r in report["runs"]} == objectives and all(r["epsilon"] > 0 for r in report["runs"])


def test_a_model_fine_tuned_from_dp_pretrained_weights_composes_the_epsilons(dp_pretrained, tmp_path: Path) -> None:
    weights = dp_pretrained["ssl"]
    pre = json.loads((weights.parent / "encoder_card.json").read_text())["sites"]
    root = _copy(dp_pretrained["root"], tmp_path / "sites")
    cfg = compose(TINY + DP + [f"data_root={root}", f"run_dir={tmp_path / 'ft'}", f"model.pretrained_path={weights}"])
    arrays, recorder = run_federation(InProcessGrid(_nodes()), cfg, tmp_path / "ft")
    recorder.finish(arrays)
    card = json.loads((tmp_path / "ft" / "model_card.json").read_text())
    comp = card["privacy_composition"]
    assert "sequential composition" in comp["rule"] and comp["pretraining_objective"] == "pretrain:ssl/simsiam"
    for site in ("site_a", "site_b"):
        row = comp["sites"][site]
        ft = card["sites"][site]["epsilon"]
        assert row["pretraining_epsilon"] == pytest.approx(pre[site]["epsilon"]) and row["finetuning_epsilon"] == pytest.approx(ft)
        assert row["epsilon_total"] == pytest.approx(pre[site]["epsilon"] + ft)
        assert row["delta_total"] == pytest.approx(2e-5)


def test_composition_has_no_bound_where_a_run_had_no_dp() -> None:
    pre = {"objective": "ssl", "objective_label": "pretrain:ssl/simsiam",
           "sites": {"a": {"epsilon": None, "delta": None}, "b": {"epsilon": 2.0, "delta": 1e-5}}}
    comp = compose_privacy(pre, {"a": {"epsilon": 3.0, "delta": 1e-5}, "b": {"epsilon": 3.0, "delta": 1e-5},
                                 "c": {"epsilon": 1.0, "delta": 1e-5}})
    assert comp["sites"]["a"]["epsilon_total"] is None and "without DP" in comp["sites"]["a"]["note"]
    assert comp["sites"]["b"]["epsilon_total"] == 5.0 and comp["sites"]["c"]["epsilon_total"] == 1.0
    assert compose_privacy({"data": "public", "sites": {"x": {"patients": 3}}}, {}) is None  # public weights: nothing to add


def test_deployment_serverapp_runs_a_pretraining_job_from_the_run_config(sites: Path, tmp_path: Path) -> None:
    """What `fedmsk launch objective=...` / `flwr run` do: the deployed ServerApp (no config of its own) composes the
    run config's overrides, and the sites' ClientApp answers through Flower messages; the encoders come out."""
    from flwr.app import Context, RecordDict

    from server.app import make_server_app

    root = _copy(sites, tmp_path / "sites")
    run_dir = tmp_path / "run"
    overrides = " ".join(TINY + [f"data_root={root}", f"run_dir={run_dir}", "pretrain=crossmodal"])
    grid = InProcessGrid(_nodes())
    make_server_app()(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={"overrides": overrides}))
    assert {m.metadata.message_type for m in grid.sent} == {"train", "evaluate"}
    card = json.loads((run_dir / "encoder_card.json").read_text())
    assert card["objective"] == "crossmodal" and card["encoders"] == ["clinical", "image"]
    assert all(s["patients"] > 0 and not s["dp"] for s in card["sites"].values())
    events = (run_dir / "events.jsonl").read_text().splitlines() if (run_dir / "events.jsonl").is_file() else []
    warned = [e["reason"] for e in map(json.loads, events) if e["event"] == "warning"]
    assert warned == ([card["feature_scale"]["warning"]] if "warning" in card["feature_scale"] else [])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["phase"] == "evaluate" and r["split"] == "val" and r["site"] == "global"]
    assert [r["round"] for r in val] == [0, 1] and all(r["loss"] > 0 for r in val)  # the objective's loss, no labels


def test_the_scale_check_flags_an_encoder_whose_activations_grew_and_passes_one_that_did_not() -> None:
    """What DP noise did at lr 0.1 (README "Label efficiency"): weights grew with no normalisation to bound them.
    The objective's normalised embedding hides it; the card's feature_scale does not."""
    cfg = compose(SMALL + ["pretrain=ssl"])
    init = {f"image.{k}": v for k, v in build_screener(cfg).net.image.state_dict().items()}
    same = feature_scale(cfg, init)
    assert same["ratio"] == 1.0 and "warning" not in same
    grown = {k: v * 20 if v.dim() > 1 else v for k, v in init.items()}  # every convolution and linear layer x20
    flagged = feature_scale(cfg, grown)
    assert flagged["init"] == same["init"] and flagged["ratio"] > SCALE_WARN
    assert "grew" in flagged["warning"] and "pretrain.dp_batch_size" in flagged["warning"]
    with pytest.raises(ValueError, match="do not fit"):
        feature_scale(cfg, init | {"image.not_a_layer.weight": torch.zeros(1)})


def test_a_fine_tune_from_a_flagged_encoder_says_so_before_training(tmp_path: Path) -> None:
    from rich.console import Console

    from simulation.runner import warn_inflated_encoder

    cfg = compose(SMALL + ["pretrain=ssl"])
    init = {f"image.{k}": v for k, v in build_screener(cfg).net.image.state_dict().items()}
    said = {}
    for name, state in (("kept", init), ("grown", {k: v * 20 if v.dim() > 1 else v for k, v in init.items()})):
        folder = tmp_path / name
        folder.mkdir()
        torch.save(state, folder / "encoder.pt")
        (folder / "encoder_card.json").write_text(json.dumps({"feature_scale": feature_scale(cfg, state)}))
        console = Console(record=True, width=400)
        warn_inflated_encoder(compose(SMALL + [f"model.pretrained_path={folder / 'encoder.pt'}"]), console)
        said[name] = console.export_text()
    assert said["kept"] == "" and "grown" in said["grown"] and "grew" in said["grown"]
    console = Console(record=True)
    warn_inflated_encoder(compose(SMALL), console)  # random init: nothing to say
    assert console.export_text() == ""


def test_an_encoder_file_that_does_not_fit_stops_the_run_naming_the_file(tmp_path: Path) -> None:
    wide = build_screener(compose(SMALL + ["model.width=8", "pretrain=ssl"])).net.encoders()["image"].state_dict()
    path = tmp_path / "wide_encoder.pt"
    torch.save({f"image.{k}": v for k, v in wide.items()}, path)
    with pytest.raises(ConfigError, match=r"wide_encoder\.pt.*shape mismatch"):
        build_screener(compose(SMALL + [f"model.pretrained_path={path}"]))
    torch.save({f"clinical.{k}": v for k, v in wide.items()}, path)  # names that are no clinical encoder's
    with pytest.raises(ConfigError, match=r"wide_encoder\.pt.*'clinical' encoder does not fit"):
        build_screener(compose(SMALL + [f"model.pretrained_path={path}"]))


# ---------------------------------------------------------------------------- every task's model
TASK_MODELS = {  # task -> (its model, input channels of the site's image: segclass's hand task carries 4 mask channels)
    "vertebral_fracture": (["task=vertebral_fracture", "model=fracture3d", "task.image_size=[8,8,8]"], 1),
    "osteoporosis_chest": (["task=osteoporosis_chest", "model=wavelet_fusion", "task.image_size=[16,16]"], 1),
    "osteoporosis_hand": (["task=osteoporosis_hand", "model=segclass", "task.image_size=[16,16]"], 5),
}


@pytest.mark.parametrize("task", sorted(TASK_MODELS))
def test_each_task_pretrains_and_its_model_loads_the_encoder(task: str, tmp_path: Path) -> None:
    """One step of each objective the task's model allows on the site's input layout (mask channels included),
    then model.pretrained_path: the task model's encoder is the pretrained one (a model without a clinical encoder
    refuses crossmodal naming the field)."""
    overrides, channels = TASK_MODELS[task]
    small = overrides + ["model.width=4", "model.embed_dim=16", "pretrain.proj_dim=8", "model.clinical_hidden=8"]
    g = torch.Generator().manual_seed(4)
    for objective in ("ssl", "crossmodal"):
        cfg = compose(small + [f"pretrain={objective}"])
        if objective == "crossmodal" and task == "osteoporosis_hand":
            with pytest.raises(ConfigError, match="pretrain.objective=crossmodal.*segclass.*pretrain=ssl"):
                build_screener(cfg)
            continue
        screener = build_screener(cfg)
        net = screener.net
        size = tuple(cfg.task.image_size)
        if net.uses_image_bank:
            net.set_bank(torch.rand(3, channels, *size, generator=g))
        n = 2 if objective == "ssl" else 1
        image = torch.rand(3, n * channels, *size, generator=g)
        clinical = torch.randn(3, net.clinical.net[0].in_features if objective == "crossmodal" else 1, generator=g)
        loss, _ = screener.criterion(screener(image, clinical), torch.full((3,), -1))
        loss.backward()
        torch.optim.SGD(screener.parameters(), lr=0.5).step()
        weights = tmp_path / f"{objective}.pt"
        torch.save({f"{name}.{k}": v for name, enc in net.encoders().items() for k, v in enc.state_dict().items()}, weights)
        model = build_screener(compose(small + [f"model.pretrained_path={weights}"])).net
        mine = model.state_dict()
        for name, enc in net.encoders().items():
            assert all(torch.equal(mine[f"{name}.{k}"], v) for k, v in enc.state_dict().items())
        seeded = build_screener(compose(small)).net.state_dict()
        assert any(not torch.equal(mine[k], seeded[k]) for k in mine if k.startswith("image."))  # the step moved it
        scale = feature_scale(cfg, torch.load(weights, weights_only=True))  # the card's check runs on every encoder
        assert scale["init"] > 0 and scale["final"] != scale["init"]
