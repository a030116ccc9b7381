"""Domain-adaptive denormalisation: a site's intensity statistic leaves it only noised and accounted,
a release past the budget is refused, DAD re-styles images to the target profile, and a federated run
builds its profiles from the sites' noised releases alone."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from client.ledger import PrivacyLedger
from client.privacy import calibrate_noise, epsilon_of
from client.randomness import INSECURE_SEED_ENV
from client.release import ReleaseRefused, release_intensity
from dicom_factory import ramp, valid_row, write_site
from shared.config import DadProfile, PrivacyConfig, compose
from shared.dad import DomainDenormalised, SENSITIVITY, denormalise, intensity_sums, profile_of, target_profiles

IMAGES = np.random.default_rng(0).uniform(0.2, 0.6, size=(40, 1, 8, 8)).astype(np.float32)
L1 = sum(SENSITIVITY.values())
L2 = math.sqrt(sum(v * v for v in SENSITIVITY.values()))


@pytest.fixture(autouse=True)
def _reproducible_noise(monkeypatch):
    monkeypatch.setenv(INSECURE_SEED_ENV, "test_dad")  # the noise draws are fixed, so the tolerances below never flake


def test_laplace_release_is_noised_at_the_calibrated_scale_and_booked(tmp_path):
    policy = PrivacyConfig(release_noise="laplace", release_epsilon=0.5, release_budget=1000.0)
    ledger = PrivacyLedger.load(tmp_path)
    raw = intensity_sums(IMAGES)
    draws = [release_intensity(IMAGES, policy, ledger, run_id=f"r{i}") for i in range(100)]
    noise = np.array([[d[k] - raw[k] for k in raw] for d in draws])
    scale = L1 / 0.5  # Laplace: L1 sensitivity / epsilon
    assert (noise != 0).all()  # never the raw value
    assert abs(noise.mean()) < 4 * math.sqrt(2) * scale / math.sqrt(noise.size)  # centred on the raw value
    assert noise.std() == pytest.approx(math.sqrt(2) * scale, rel=0.25)
    ledger = PrivacyLedger.load(tmp_path)  # booked on disk, one entry per release, composed by addition
    assert len(ledger.releases) == 100 and {r.split for r in ledger.releases} == {"train"}
    assert ledger.releases[0].noise_scale == pytest.approx(scale) and ledger.releases[-1].epsilon_split_total == pytest.approx(50.0)


def test_gaussian_release_uses_the_rdp_calibrated_sigma_and_composes(tmp_path):
    policy = PrivacyConfig(release_noise="none", release_epsilon=1.0, release_budget=50.0, delta=1e-5)  # none: Gaussian
    ledger = PrivacyLedger.load(tmp_path)
    raw = intensity_sums(IMAGES)
    draws = [release_intensity(IMAGES, policy, ledger, run_id=f"g{i}") for i in range(40)]
    noise = np.array([[d[k] - raw[k] for k in raw] for d in draws])
    z = calibrate_noise([], 1.0, 1, 1.0, 1e-5, "rdp")
    assert {r.mechanism for r in ledger.releases} == {"gaussian"}
    assert ledger.releases[0].noise_scale == pytest.approx(z * L2)
    assert noise.std() == pytest.approx(z * L2, rel=0.25)
    assert ledger.releases[-1].epsilon_split_total == pytest.approx(epsilon_of([(z, 1.0, 40)], 1e-5, "rdp"), rel=1e-6)


def test_release_past_the_budget_is_refused_and_not_booked(tmp_path):
    policy = PrivacyConfig(release_noise="laplace", release_epsilon=0.4, release_budget=1.0)
    ledger = PrivacyLedger.load(tmp_path)
    release_intensity(IMAGES, policy, ledger, run_id="a")
    release_intensity(IMAGES, policy, ledger, run_id="b")
    with pytest.raises(ReleaseRefused, match="release_budget 1"):
        release_intensity(IMAGES, policy, PrivacyLedger.load(tmp_path), run_id="c")
    assert [r.run_id for r in PrivacyLedger.load(tmp_path).releases] == ["a", "b"]


def test_denormalisation_restyles_to_the_target_profile():
    image = torch.from_numpy(np.random.default_rng(1).normal(0.2, 0.05, size=(1, 32, 32)).astype(np.float32)).clamp(0, 1)
    out = denormalise(image, mean=0.6, std=0.12)
    assert float(out.mean()) == pytest.approx(0.6, abs=0.005) and float(out.std()) == pytest.approx(0.12, rel=0.03)
    assert torch.corrcoef(torch.stack([image.flatten(), out.flatten()]))[0, 1] > 0.999  # same anatomy, new style
    profiles = [DadProfile("a", 0.3, 0.1), DadProfile("b", 0.6, 0.1)]
    transform = DomainDenormalised(profiles, prob=1.0)
    transform.set_random_state(seed=0)
    means = sorted({round(float(transform({"image": image})["image"].mean()), 2) for _ in range(20)})
    assert means == [0.3, 0.6]  # every image lands on one of the profiles, both are drawn
    assert target_profiles(compose(["task.augment_dad=public"]).task, "synthetic_a")[0].name == "synthetic_b"  # own one left out


def _sites(root):
    for s, high in (("site_a", 1500), ("site_b", 4000)):  # two scanners: different intensity profiles
        rows = [valid_row(f"{s}{i}", label=i % 2, age=60 + i) for i in range(24)]
        write_site(root / s, rows, images={f"{s}{i}": ramp(high=high + 40 * i) for i in range(24)})
    return root


def test_federated_profiles_come_from_noised_releases_only(tmp_path):
    from client.dad import training_images
    from server.federation import run_federation
    from tests.inprocess_grid import InProcessGrid

    root = _sites(tmp_path / "fed")
    over = ["model=logreg", "rounds=1", "num_sites=2", "task.image_size=[16,16]", "task.augment_dad=federated",
            "task.dad_prob=1", "privacy.release_noise=laplace", "privacy.release_epsilon=2", "privacy.release_budget=3",
            f"data_root={root}"]
    cfg = compose(over + [f"run_dir={tmp_path / 'run'}"])
    grid = InProcessGrid({100: {"partition-id": 0}, 101: {"partition-id": 1}})
    run_federation(grid, cfg, tmp_path / "run")
    profiles = {p["name"]: p for p in json.loads((tmp_path / "run" / "dad_profiles.json").read_text())}
    assert set(profiles) == {"site_a", "site_b", "consortium"}
    for site in ("site_a", "site_b"):
        raw = profile_of(intensity_sums(training_images(str(root / site), cfg)), site, "raw")
        assert (profiles[site]["mean"], profiles[site]["std"]) != (raw.mean, raw.std)  # noised, never the raw value
        (entry,) = [r for r in PrivacyLedger.load(root / site).releases if r.split == "train"]  # booked once, at the site
        assert entry.split == "train" and entry.epsilon == pytest.approx(2.0)
    (sent,) = {str(m.content["config"]["fedmsk-job"]) for m in grid.sent if m.metadata.message_type == "train"}
    assert f"mean: {profiles['consortium']['mean']}" in sent  # the profiles travel to the sites in the job config
    from shared.config import from_yaml
    from shared.dad import dad_transform

    restyle = dad_transform(from_yaml(sent).task, "site_a", 0)  # what site_a's training augmentation re-styles towards
    assert {p.name for p in restyle.profiles} == {"site_b", "consortium"}
    # a second run would take the releases to epsilon 4 > budget 3: every site refuses, the run stops at start
    with pytest.raises(RuntimeError, match="no site released"):
        run_federation(InProcessGrid({100: {"partition-id": 0}, 101: {"partition-id": 1}}),
                       compose(over + [f"run_dir={tmp_path / 'run2'}"]), tmp_path / "run2")
