"""Privacy of the whole site pipeline, not only the gradient: secret randomness, what a site
answers and releases, and clinical scaling that does not couple patients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.data_loader import DPDataLoader

from client.app import run_evaluate, run_train
from client.ledger import PrivacyLedger
from client.privacy import SitePrivacy
from client.randomness import INSECURE_SEED_ENV
from client.trainer import build_screener, make_loader
from shared.config import PrivacyConfig, compose, to_yaml
from shared.messages import EVAL_METRIC_KEYS, TRAIN_METRIC_KEYS, site_reply
from shared.metrics import histogram_auc, histograms_of
from shared.sitedata import SiteData, make_datasets
from simulation.synth import write_federation
from tests.test_privacy import Patients, small_cfg

TINY = [
    "num_sites=2", "synth.patients_per_site=[40,40]", "synth.image_size=32", "task.image_size=[16,16]",
    "task.augment=false", "model.width=4", "model.embed_dim=16", "model.proj_dim=8", "model.clinical_hidden=8",
    "model.aux_loss=prototype", "model.aux_weight=0.5", "federation.local_epochs=1", "rounds=2",
]
POLICY = PrivacyConfig(enabled=True, target_epsilon=8.0, delta=1e-5, accountant="rdp")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("pipeline") / "sites"
    write_federation(compose(TINY + [f"data_root={root}"]))
    return root


def job(root, tmp_path, *extra: str) -> str:
    """The run config a server sends; each test gets its own copy of the sites (its own ledgers)."""
    import shutil

    sites = tmp_path / "sites"
    if not sites.exists():
        shutil.copytree(root, sites)
    return to_yaml(compose(TINY + [f"data_root={sites}", *extra]))


def initial(job_yaml: str) -> dict[str, torch.Tensor]:
    from shared.config import from_yaml

    return build_screener(from_yaml(job_yaml)).state_dict()


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.double().ravel() for v in state.values() if v.is_floating_point()])


# ---------------------------------------------------------------------------- (1) secret randomness
def drawn_batches(loader, epochs: int = 4) -> list[tuple[float, ...]]:
    """Each batch as the sorted ids (first clinical value) of the patients in it."""
    return [tuple(sorted(b["clinical"][:, 0].tolist())) for _ in range(epochs) for b in loader]


def test_poisson_batches_are_secret_to_the_site(tmp_path) -> None:
    """Two sites given the same seed by the server draw different batches, and the server cannot replay them."""
    cfg = small_cfg("prototype", dp=True)
    data = Patients(24, 5)
    server_seed = 1 * 1000 + 1  # what the old code derived from the run's seed and round
    draws = []
    for site in ("a", "b"):
        privacy = SitePrivacy.open(tmp_path / site, POLICY)
        privacy.begin_round("r", 1, planned_rounds=2, local_epochs=1, n_train=24, batch_size=8)
        screener = build_screener(cfg)
        opt = torch.optim.SGD(screener.parameters(), lr=0.1)
        module, _, loader = privacy.make_private(screener, opt, make_loader(data, 8, shuffle=True, seed=server_seed))
        draws.append(drawn_batches(loader))
        privacy.detach(module)
    replay = drawn_batches(DPDataLoader.from_data_loader(make_loader(data, 8, shuffle=True, seed=server_seed)))
    assert draws[0] != draws[1]
    assert replay not in draws


def full_batch_round(site_dir, seed_env: str | None, monkeypatch) -> torch.Tensor:
    """One DP round in which Poisson sampling takes everyone (rate 1): only the noise is random."""
    from client.trainer import train_local

    if seed_env is None:
        monkeypatch.delenv(INSECURE_SEED_ENV, raising=False)
    else:
        monkeypatch.setenv(INSECURE_SEED_ENV, seed_env)
    cfg = small_cfg("prototype", dp=True)
    privacy = SitePrivacy.open(site_dir, POLICY)
    privacy.begin_round("r", 1, planned_rounds=1, local_epochs=1, n_train=8, batch_size=8)
    screener = build_screener(cfg)
    torch.manual_seed(0)  # a process state the server can know (torch's default seed, the run's seed)
    train_local(screener, make_loader(Patients(8, 5), 8, shuffle=True, seed=0), cfg.federation, "cpu", epochs=1,
                privacy=privacy)
    privacy.end_round()
    return flat(screener.state_dict())


def test_dp_noise_is_secret_and_reproducible_only_by_the_sites_own_switch(tmp_path, monkeypatch) -> None:
    a = full_batch_round(tmp_path / "a", None, monkeypatch)
    b = full_batch_round(tmp_path / "b", None, monkeypatch)
    assert (a - b).abs().max() > 1e-4  # same data, same batch, same process RNG state: different noise
    c = full_batch_round(tmp_path / "c", "42", monkeypatch)
    d = full_batch_round(tmp_path / "d", "42", monkeypatch)
    assert torch.equal(c, d)  # FEDMSK_INSECURE_DP_SEED, set at the site, makes tests repeatable


def test_non_dp_training_order_is_not_replayable(root, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(INSECURE_SEED_ENV, raising=False)
    job_yaml = job(root, tmp_path)
    weights = initial(job_yaml)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)  # the same process state twice: only the site's own shuffle differs
        _, state, _ = run_train({"partition-id": 0}, job_yaml, {k: v.clone() for k, v in weights.items()}, 1, "r")
        runs.append(flat(state))
    assert (runs[0] - runs[1]).abs().max() > 1e-6


# ---------------------------------------------------------------------------- (2) (3) what a site answers
def test_a_site_never_answers_for_its_training_split(root, tmp_path) -> None:
    job_yaml = job(root, tmp_path)
    site, metrics = run_evaluate({"partition-id": 0}, job_yaml, initial(job_yaml), "val")
    assert metrics["num-examples"] > 0
    with pytest.raises(ValueError, match="answers only for val, test"):
        run_evaluate({"partition-id": 0}, job_yaml, initial(job_yaml), "train")


def test_under_dp_the_train_reply_carries_no_private_loss_and_the_same_keys(root, tmp_path) -> None:
    plain_job = job(root, tmp_path)
    dp_job = job(root, tmp_path, "privacy.enabled=true", "privacy.target_epsilon=8", "privacy.accountant=rdp")
    _, _, plain = run_train({"partition-id": 0}, plain_job, initial(plain_job), 1, "plain")
    _, state, dp = run_train({"partition-id": 1}, dp_job, initial(dp_job), 1, "dp")
    assert set(dp) == set(plain)  # Flower aborts a round whose sites reply with different keys
    assert math.isfinite(plain["train_loss"]) and math.isfinite(plain["train_acc"])
    assert math.isnan(dp["train_loss"]) and math.isnan(dp["train_acc"])
    assert dp["dp"] == 1.0 and 0 < dp["epsilon"] <= 8.0
    steps = PrivacyLedger.load(tmp_path / "sites" / "site_b").steps_taken()
    assert dp["steps"] == steps  # the accountant's count, not the Poisson-dependent physical batches
    site_reply(site_name="s", metrics=dp, allowed=TRAIN_METRIC_KEYS, state=state, expected_keys=set(state))


# ---------------------------------------------------------------------------- (4) clinical scaling
def synthetic_site(task, n: int = 30, seed: int = 0) -> SiteData:
    rng = np.random.default_rng(seed)
    raw = np.stack([rng.uniform(60, 90, n), rng.integers(0, 2, n), rng.normal(165, 9, n), rng.normal(70, 12, n),
                    rng.normal(25, 4, n), np.full(n, np.nan), np.full(n, np.nan)], axis=1).astype(np.float32)
    raw[3, 3] = np.nan  # an imputed weight: the fill value is a statistic too
    return SiteData("s", None, [f"p{i}" for i in range(n)], np.zeros((n, 1, 16, 16), np.float32), raw,
                    (np.arange(n) % 2).astype(np.int64))


def other_patients_moved(private: bool) -> float:
    """Largest change of any other patient's model input when one training patient's record changes."""
    from shared.sitedata import split_indices

    task = compose(["task.image_size=[16,16]", "task.augment=false"]).task
    site = synthetic_site(task)
    before = make_datasets(site, task, seed=0, private=private)
    changed = split_indices(site.labels, task.split, 0, groups=site.patient_ids)["train"][0]  # train item 0
    site.clinical_raw[changed, 0] = 18.0  # one extreme but valid record: age and weight
    site.clinical_raw[changed, 3] = 250.0
    after = make_datasets(site, task, seed=0, private=private)
    assert not torch.equal(before["train"].data[0]["clinical"], after["train"].data[0]["clinical"])
    others = [(x, y) for split in ("train", "val", "test") for x, y in zip(before[split].data, after[split].data)][1:]
    return max(float((x["clinical"] - y["clinical"]).abs().max()) for x, y in others)


def test_under_dp_one_patients_record_leaves_every_other_input_unchanged() -> None:
    assert other_patients_moved(private=True) == 0.0
    assert other_patients_moved(private=False) > 0.1  # the fitted scaler couples them: the check can fail


# ---------------------------------------------------------------------------- (5) released evaluation counts
@pytest.mark.parametrize("mechanism, budget", [("laplace", 2.5), ("gaussian", 1.6)])  # room for 2 releases, not 3
def test_released_counts_are_noised_and_booked(root, tmp_path, mechanism: str, budget: float) -> None:
    own = tmp_path / "site_privacy.yaml"
    own.write_text(f"enabled: false\nrelease_noise: {mechanism}\nrelease_epsilon: 1.0\nrelease_budget: {budget}\n")
    job_yaml = job(root, tmp_path)
    weights = initial(job_yaml)
    exact = run_evaluate({"partition-id": 0}, job_yaml, weights, "val")[1]
    node = {"partition-id": 0, "privacy-config": str(own)}
    released = [run_evaluate(node, job_yaml, weights, "val", rnd, "r")[1] for rnd in (1, 2)]
    for noisy in released:
        assert set(noisy) == set(exact) and set(noisy) <= EVAL_METRIC_KEYS
        assert any(noisy[k] != exact[k] for k in ("tp", "fp", "tn", "fn"))
        assert all(noisy[k] != int(noisy[k]) or noisy[k] == 0 for k in ("tp", "fp", "tn", "fn"))  # noised, not rounded
        assert math.isnan(noisy["loss"])  # a mean over per-patient scores: not released
        hist = [k for k in noisy if k.startswith("hist_")]
        assert hist and any(noisy[k] != exact[k] for k in hist)  # the score histograms are noised too
        assert noisy["auc"] == pytest.approx(histogram_auc(*histograms_of(noisy)))  # AUC only from them
        assert noisy["num-examples"] == pytest.approx(sum(noisy[k] for k in ("tp", "fp", "tn", "fn")))
    ledger = PrivacyLedger.load(tmp_path / "sites" / "site_a")
    assert [(r.split, r.mechanism) for r in ledger.releases] == [("val", mechanism)] * 2
    assert ledger.releases[1].epsilon_split_total > ledger.releases[0].epsilon_split_total >= 0.99
    from client.release import ReleaseRefused

    with pytest.raises(ReleaseRefused, match="release budget spent"):  # a third release would pass the budget
        run_evaluate(node, job_yaml, weights, "val", 3, "r")
    run_evaluate(node, job_yaml, weights, "test", 3, "r")  # the test patients have their own budget
    assert len(PrivacyLedger.load(tmp_path / "sites" / "site_a").releases) == 3


# ---------------------------------------------------------------------------- DP training settings of the policy
def test_the_policys_dp_training_settings_drive_the_private_round(root, tmp_path) -> None:
    """A site's policy (or the eps presets) sets batch size and local epochs under DP: the plan follows them."""
    own = tmp_path / "site_privacy.yaml"
    own.write_text("enabled: true\ntarget_epsilon: 8\naccountant: rdp\nbatch_size: 4\nlocal_epochs: 2\nlr: 0.05\noptimizer: sgd\n")
    job_yaml = job(root, tmp_path, "federation.batch_size=16", "federation.local_epochs=1")
    _, _, metrics = run_train({"partition-id": 0, "privacy-config": str(own)}, job_yaml, initial(job_yaml), 1, "r")
    plan = PrivacyLedger.load(tmp_path / "sites" / "site_a").plans["r"]
    per_epoch = math.ceil(metrics["num-examples"] / 4)  # batches of 4, not the run's 16
    assert plan.sample_rate == pytest.approx(1 / per_epoch)
    assert metrics["steps"] == 2 * per_epoch  # two local epochs, not the run's one


# ---------------------------------------------------------------------------- ghost clipping's per-sample losses
@pytest.mark.parametrize("aux", ["prototype", "infonce_bank", "views"])
def test_ghost_criterion_gives_each_patients_own_loss(aux: str) -> None:
    """Opacus' ghost clipping reweights per-sample losses: ours must average to the batch loss we train on."""
    from client.privacy import GhostCriterion

    screener = build_screener(small_cfg(aux))
    data = Patients(6, 5)
    torch.manual_seed(0)
    outputs = screener(data.image, data.clinical)
    ghost = GhostCriterion(screener.criterion)
    batch = ghost(outputs, data.label)
    ghost.reduction = "none"
    per_sample = ghost(outputs, data.label)
    assert per_sample.shape == (6,)
    assert per_sample.mean().item() == pytest.approx(batch.item(), rel=1e-5)
    alone = screener.criterion({k: v[2:3] for k, v in outputs.items() if torch.is_tensor(v)}, data.label[2:3])[0]
    assert per_sample[2].item() == pytest.approx(alone.item(), rel=1e-5)
