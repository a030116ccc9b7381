"""DP-SGD at a site: per-sample decoupling of the losses, the ledger, the budget, the reported epsilon."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from torch.utils.data import Dataset

from client.ledger import LedgerError, PrivacyLedger, ledger_path
from client.privacy import BudgetSpent, SitePrivacy, budget_report, epsilon_of, resolve_policy
from client.trainer import build_screener, make_loader, train_local
from shared.config import ConfigError, PrivacyConfig, compose
from shared.losses import AUX_LOSSES, DP_SAFE_AUX

SMALL = ["task.image_size=[16,16]", "model.width=4", "model.embed_dim=16", "model.proj_dim=8", "model.clinical_hidden=8"]
REPO = Path(__file__).resolve().parent.parent


def small_cfg(aux: str = "prototype", dp: bool = False, model: str = "mmcl"):
    return compose(SMALL + [f"model={model}", f"model.aux_loss={aux}", "model.aux_weight=0.5", f"privacy.enabled={str(dp).lower()}"])


class Patients(Dataset):
    def __init__(self, n: int, n_clinical: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.image = torch.rand(n, 1, 16, 16, generator=g)
        self.clinical = torch.randn(n, n_clinical, generator=g)
        self.label = torch.arange(n) % 2

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.image[i], "clinical": self.clinical[i], "label": self.label[i]}


# ---------------------------------------------------------------------------- decoupling
def per_sample_grads(screener, image, clinical, labels) -> torch.Tensor:
    """[B, n_params] per-sample gradients of the criterion's loss, by Opacus' hooks."""
    gsm = GradSampleModule(screener)
    torch.manual_seed(0)  # same dropout masks for both batches
    loss, _ = screener.criterion(gsm(image, clinical), labels)
    loss.backward()
    rows = torch.cat([p.grad_sample.reshape(len(labels), -1) for p in screener.parameters() if p.requires_grad], dim=1)
    gsm._close()
    return rows


def replaced_patient_effect(aux: str, model: str = "mmcl") -> torch.Tensor:
    """Max change of each OTHER patient's per-sample gradient when patient 3 is replaced."""
    cfg = small_cfg(aux, model=model)
    data = Patients(8, 5)
    image, clinical, labels = data.image.clone(), data.clinical.clone(), data.label.clone()
    base = per_sample_grads(build_screener(cfg), image, clinical, labels)
    other = Patients(8, 5, seed=9)
    image[3], clinical[3], labels[3] = other.image[3], other.clinical[3], 1 - labels[3]
    moved = per_sample_grads(build_screener(cfg), image, clinical, labels)
    keep = [i for i in range(8) if i != 3]
    return ((moved[keep] - base[keep]).abs().amax(dim=1) / base[keep].abs().amax(dim=1))


# segmentation needs segclass's decoders (its per-sample test: tests/test_osteoporosis_hand.py)
@pytest.mark.parametrize("aux", [a for a in DP_SAFE_AUX if a != "segmentation"])
def test_dp_safe_losses_keep_per_sample_gradients_independent(aux: str) -> None:
    assert replaced_patient_effect(aux).max() < 1e-5


def test_late_fusion_per_sample_gradients_are_independent() -> None:
    assert replaced_patient_effect("prototype", model="late_fusion").max() < 1e-5


@pytest.mark.parametrize("aux", ["infonce", "supcon"])
def test_decoupling_check_fails_for_in_batch_contrast(aux: str) -> None:
    assert AUX_LOSSES[aux].couples_batch
    assert replaced_patient_effect(aux).max() > 1e-3


# ---------------------------------------------------------------------------- one private round
def private_round(site_dir: Path, policy: PrivacyConfig, run_id: str, rnd: int, planned_rounds: int = 3, n: int = 24):
    cfg = small_cfg("prototype", dp=True)
    privacy = SitePrivacy.open(site_dir, policy)
    privacy.begin_round(run_id, rnd, planned_rounds=planned_rounds, local_epochs=1, n_train=n, batch_size=8)
    screener = build_screener(cfg)
    loader = make_loader(Patients(n, 5), 8, shuffle=True, seed=rnd)
    result = train_local(screener, loader, cfg.federation, "cpu", epochs=1, privacy=privacy)
    return privacy, result, privacy.end_round(), screener


RDP = PrivacyConfig(enabled=True, target_epsilon=6.0, delta=1e-5, max_grad_norm=1.0, accountant="rdp")


@pytest.fixture(scope="module")
def trained_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site that trained rounds 1 and 2 of a run planned for 3 (about 2/3 of its budget spent)."""
    site = tmp_path_factory.mktemp("site")
    for rnd in (1, 2):
        private_round(site, RDP, "run-a", rnd, planned_rounds=3)
    return site


def copy_of(site: Path, tmp_path: Path) -> Path:
    shutil.copytree(site, tmp_path / "site")
    return tmp_path / "site"


def test_reported_epsilon_is_the_accountants_for_the_steps_taken(tmp_path: Path) -> None:
    """PRV, the default accountant: the epsilon a site reports is Opacus' for the steps it took."""
    policy = PrivacyConfig(enabled=True, target_epsilon=6.0, delta=1e-5, accountant="prv")
    privacy, _, metrics, screener = private_round(tmp_path, policy, "r", 1, planned_rounds=2)
    plan = privacy.ledger.plans["r"]
    assert plan.sample_rate == pytest.approx(1 / 3)  # 24 patients, batches of 8: Poisson rate 1/3, 3 steps
    acc = create_accountant("prv")
    for _ in range(3):  # every step counts, an empty Poisson batch too
        acc.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
    assert metrics["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert metrics["dp"] == 1.0 and metrics["delta"] == 1e-5
    assert all(torch.isfinite(p).all() for p in screener.parameters())


def test_a_round_whose_first_poisson_batch_is_empty_takes_its_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Poisson sampling can draw no patient for a loader's very first batch (about e^-batch); Opacus then
    builds the empty batch from ``dataset[0]``, which for dict items stopped the round with a TypeError
    (CI, a site at batch 4). The round goes on: the empty batch takes its noisy step, all steps counted."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    drawn = UniformWithReplacementSampler.__iter__

    def first_empty(self):
        batches = drawn(self)
        next(batches)
        yield []  # the first draw holds nobody
        yield from batches

    monkeypatch.setattr(UniformWithReplacementSampler, "__iter__", first_empty)
    policy = PrivacyConfig(enabled=True, target_epsilon=6.0, delta=1e-5, accountant="rdp")
    before = [p.detach().clone() for p in build_screener(small_cfg("prototype", dp=True)).parameters()]
    privacy, result, metrics, screener = private_round(tmp_path, policy, "r", 1, planned_rounds=2)
    assert result.steps == 3 and privacy.ledger.steps_taken() == 3  # the empty batch's step is taken and accounted
    assert all(torch.isfinite(p).all() for p in screener.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, screener.parameters()))  # noise reached the weights
    assert metrics["epsilon"] > 0


def test_noise_is_calibrated_for_the_whole_planned_schedule(trained_site: Path) -> None:
    ledger = PrivacyLedger.load(trained_site)
    plan = ledger.plans["run-a"]
    assert plan.planned_steps == 9 and ledger.steps_taken() == 6
    acc = create_accountant("rdp")
    acc.history = [(plan.noise_multiplier, plan.sample_rate, 9)]  # all 3 planned rounds land within the target
    assert 0.97 * RDP.target_epsilon < acc.get_epsilon(RDP.delta) <= RDP.target_epsilon * 1.001
    acc.history = [(plan.noise_multiplier, plan.sample_rate, 6)]  # what the ledger reports after 2 rounds
    assert ledger.rounds[-1].epsilon_total == pytest.approx(acc.get_epsilon(RDP.delta), rel=1e-9)


def test_site_at_its_budget_refuses(trained_site: Path, tmp_path: Path) -> None:
    site = copy_of(trained_site, tmp_path)
    ledger = PrivacyLedger.load(site)
    plan = ledger.plans["run-a"]
    ledger.history = ledger.history + [(plan.noise_multiplier, plan.sample_rate, 3)]  # round 3 of 3 was taken
    ledger.save()
    privacy = SitePrivacy.open(site, RDP)  # a fresh process: the ledger is all it knows
    with pytest.raises(BudgetSpent, match="budget spent.*declines to train"):  # a 4th round was never planned
        privacy.begin_round("run-a", 4, planned_rounds=4, local_epochs=1, n_train=24, batch_size=8)
    with pytest.raises(BudgetSpent, match="budget spent"):  # nor is a new run
        privacy.begin_round("run-b", 1, planned_rounds=2, local_epochs=1, n_train=24, batch_size=8)
    assert PrivacyLedger.load(site).steps_taken() == 9  # refusals took no step


def test_a_new_run_gets_only_what_is_left(trained_site: Path, tmp_path: Path) -> None:
    site = copy_of(trained_site, tmp_path)
    first = PrivacyLedger.load(site).plans["run-a"].noise_multiplier
    plan = SitePrivacy.open(site, RDP).begin_round("run-b", 1, planned_rounds=3, local_epochs=1, n_train=24, batch_size=8)
    assert plan.noise_multiplier > first * 1.2  # the same schedule on a third of the budget needs more noise


# ---------------------------------------------------------------------------- ledger on disk
WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from client.ledger import PrivacyLedger
    site, mode = sys.argv[1], sys.argv[2]
    ledger = PrivacyLedger.load(site)
    ledger.history = ledger.history + [(1.5, 0.25, 1000)]
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if mode == "before-replace":
        os.replace = die          # temp file fully written, never renamed
    elif mode == "mid-write":
        os.fsync = die            # temp file written but not synced nor renamed
    ledger.save()
    """
)


def run_writer(site: Path, mode: str) -> int:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", WRITER, str(site), mode], env=env, cwd=REPO).returncode


def test_ledger_persists_across_a_process_restart(trained_site: Path, tmp_path: Path) -> None:
    site = copy_of(trained_site, tmp_path)
    old = PrivacyLedger.load(site).history
    assert run_writer(site, "clean") == 0  # a fresh process reads the site's history, adds steps, exits
    ledger = PrivacyLedger.load(site)
    assert ledger.history == old + [(1.5, 0.25, 1000)]
    assert epsilon_of(ledger.history, 1e-5, "rdp") > epsilon_of(old, 1e-5, "rdp")


@pytest.mark.parametrize("mode", ["before-replace", "mid-write"])
def test_ledger_survives_a_kill_while_writing(trained_site: Path, tmp_path: Path, mode: str) -> None:
    site = copy_of(trained_site, tmp_path)
    before = ledger_path(site).read_text()
    assert run_writer(site, mode) == -9
    assert ledger_path(site).read_text() == before  # the old ledger, whole
    ledger = PrivacyLedger.load(site)
    assert len(ledger.rounds) == 2 and ledger.steps_taken() == 6
    ledger.save()  # and the site can go on writing


def test_a_corrupt_ledger_stops_the_site(tmp_path: Path) -> None:
    ledger_path(tmp_path).parent.mkdir()
    ledger_path(tmp_path).write_text('{"format": 1, "hist')
    with pytest.raises(LedgerError, match="privacy_ledger.json.*will not train"):
        SitePrivacy.open(tmp_path, RDP)


# ---------------------------------------------------------------------------- policy and refusals
def test_site_policy_wins_and_the_server_cannot_raise_a_pinned_budget(tmp_path: Path) -> None:
    own = tmp_path / "own.yaml"
    own.write_text("enabled: true\ntarget_epsilon: 2.0\naccountant: rdp\n")
    proposed = PrivacyConfig(enabled=False, target_epsilon=50.0)
    policy = resolve_policy({"privacy-config": str(own)}, proposed, tmp_path)
    assert policy.enabled and policy.target_epsilon == 2.0  # the site requires DP even if the run does not
    SitePrivacy.open(tmp_path, policy)  # pins the site's policy in its ledger
    later = resolve_policy({}, PrivacyConfig(enabled=True, target_epsilon=50.0), tmp_path)
    assert later.target_epsilon == 2.0 and later.accountant == "rdp"
    bad = tmp_path / "bad.yaml"
    bad.write_text("target_epsilonn: 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        resolve_policy({"privacy-config": str(bad)}, proposed, tmp_path)


def test_make_private_refuses_a_batch_coupled_loss(trained_site: Path, tmp_path: Path) -> None:
    """A site that turns DP on itself still refuses the run's in-batch SupCon."""
    screener = build_screener(small_cfg("supcon", dp=False))
    privacy = SitePrivacy.open(copy_of(trained_site, tmp_path), RDP)
    privacy.begin_round("run-a", 3, planned_rounds=3, local_epochs=1, n_train=24, batch_size=8)
    opt = torch.optim.SGD(screener.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="couples the patients.*prototype"):
        privacy.make_private(screener, opt, make_loader(Patients(24, 5), 8, shuffle=True, seed=0))


def test_privacy_report_and_cli(trained_site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    assert main(["privacy", str(tmp_path)]) == 0
    assert "no private training" in capsys.readouterr().out
    report = budget_report(trained_site)
    assert [r["round"] for r in report["runs"][0]["rounds"]] == [1, 2]
    assert report["left"] == pytest.approx(RDP.target_epsilon - report["spent"])
    assert report["spent"] == pytest.approx(report["runs"][0]["rounds"][-1]["epsilon_total"])
    assert main(["privacy", str(trained_site), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 6
    assert main(["privacy", str(trained_site)]) == 0
    out = capsys.readouterr().out
    assert "run-a" in out and "left" in out


def test_client_level_dp_noise_meets_its_target() -> None:
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

    from client.privacy import client_level_epsilon, client_level_noise
    from server.strategy import with_client_level_dp

    sigma = client_level_noise(target_epsilon=8.0, delta=1e-3, rounds=5)
    assert 0.97 * 8.0 < client_level_epsilon(sigma, 1e-3, 5) <= 8.0 * 1.001
    assert client_level_epsilon(sigma, 1e-3, 10) > 8.0  # more rounds than planned overspend
    wrapped = with_client_level_dp(FedAvg(), noise_multiplier=sigma, clipping_norm=1.0, num_sites=5)
    assert isinstance(wrapped, DifferentialPrivacyServerSideFixedClipping) and wrapped.noise_multiplier == sigma


def test_privacy_cli_lists_the_noised_releases_beside_training(trained_site: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main
    from client.release import release_counts

    site = copy_of(trained_site, tmp_path)
    laplace = PrivacyConfig(enabled=True, release_noise="laplace", release_epsilon=0.5, release_budget=10.0)
    gaussian = PrivacyConfig(enabled=True, release_noise="gaussian", release_epsilon=0.5, release_budget=10.0)
    counts = {"tp": 5.0, "fp": 2.0, "tn": 10.0, "fn": 3.0, "num-examples": 20.0, "loss": 0.4}
    for policy, rnd, split in [(laplace, 1, "val"), (laplace, 2, "val"), (laplace, 2, "test"), (gaussian, 3, "test")]:
        release_counts(counts, policy, PrivacyLedger.load(site), run_id="run-a", rnd=rnd, split=split, n_classes=2)
    assert main(["privacy", str(site), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["runs"][0]["run_id"] == "run-a"  # the training entries are still there
    rel = report["releases"]
    assert [(e["round"], e["split"], e["mechanism"]) for e in rel["entries"]] == [
        (1, "val", "laplace"), (2, "val", "laplace"), (2, "test", "laplace"), (3, "test", "gaussian")]
    assert rel["splits"]["val"]["epsilon"] == pytest.approx(1.0)  # two Laplace releases at 0.5 add up
    assert rel["splits"]["val"]["delta"] == 0.0  # Laplace is pure epsilon-DP
    (tmp_path / "gauss-alone").mkdir()
    alone = PrivacyLedger.load(tmp_path / "gauss-alone")  # the same Gaussian release with no Laplace before it
    release_counts(counts, gaussian, alone, run_id="g", rnd=1, split="test", n_classes=2)
    gauss = alone.releases[-1].epsilon_split_total
    # a policy that switched mechanisms keeps the earlier Laplace release in the split's total
    assert rel["entries"][-1]["epsilon_split_total"] == pytest.approx(0.5 + gauss) and gauss > 0
    assert rel["splits"]["test"]["epsilon"] == pytest.approx(0.5 + gauss)
    assert main(["privacy", str(site)]) == 0
    out = capsys.readouterr().out
    assert "run-a" in out and "left" in out  # training spend first,
    assert "released evaluation counts" in out and "split val: 2 releases, epsilon spent 1.000" in out  # then releases
    only = tmp_path / "release-only"  # a site that noises its reports but never trained under DP
    only.mkdir()
    release_counts(counts, laplace, PrivacyLedger.load(only), run_id="r", rnd=1, split="test", n_classes=2)
    assert main(["privacy", str(only)]) == 0
    out = capsys.readouterr().out
    assert "DP-SGD never ran" in out and "split test: 1 releases, epsilon spent 0.500" in out
