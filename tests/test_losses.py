"""Losses: coupling declared = coupling observed, values move the right way, DP refusal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared.config import ConfigError, FedmskConfig, ModelConfig, PrivacyConfig, TaskConfig
from shared.losses import AUX_LOSSES, DP_SAFE_AUX, build_criterion

B, D, P = 8, 16, 8


def make_cfg(aux: str, weight: float = 1.0, dp: bool = False) -> FedmskConfig:
    return FedmskConfig(
        task=TaskConfig(name="t", label_column="y"),
        model=ModelConfig(aux_loss=aux, aux_weight=weight, embed_dim=D, proj_dim=P),
        privacy=PrivacyConfig(enabled=dp),
    )


def fake_outputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "logits": torch.randn(B, 2, generator=g),
        "z_image": torch.randn(B, D, generator=g),
        "z_clinical": torch.randn(B, D, generator=g),
        "proj": F.normalize(torch.randn(B, P, generator=g), dim=-1),
        "proto_logits": torch.randn(B, 2, generator=g),
        "proj_views": F.normalize(torch.randn(B, 2, P, generator=g), dim=-1),
    }


LABELS = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])


def grad_wrt_row(aux: str, outputs: dict[str, torch.Tensor], row: int) -> torch.Tensor:
    """Gradient of the aux loss with respect to every output of one row."""
    crit = build_criterion(make_cfg(aux))
    leaves = {k: v.clone().requires_grad_(True) for k, v in outputs.items()}
    crit.aux(leaves, LABELS).backward()
    return torch.cat([leaves[k].grad[row].flatten() for k in sorted(leaves) if leaves[k].grad is not None])


# segmentation reads segclass's decoder outputs and the site's masks (its per-patient test:
# tests/test_osteoporosis_hand.py)
@pytest.mark.parametrize("aux", sorted(set(AUX_LOSSES) - {"none", "segmentation"}))
def test_declared_coupling_matches_behaviour(aux: str) -> None:
    """Replace patient 3's outputs: a per-sample loss leaves patient 0's gradient as it was."""
    a = fake_outputs(0)
    b = {k: v.clone() for k, v in a.items()}
    other = fake_outputs(99)
    for k in b:
        b[k][3] = other[k][3]
    unchanged = torch.allclose(grad_wrt_row(aux, a, 0), grad_wrt_row(aux, b, 0), atol=1e-7)
    assert unchanged != AUX_LOSSES[aux].couples_batch
    assert AUX_LOSSES["supcon"].couples_batch and AUX_LOSSES["infonce"].couples_batch
    assert not AUX_LOSSES["prototype"].couples_batch


def test_supcon_rewards_class_clusters() -> None:
    crit = build_criterion(make_cfg("supcon")).aux
    g = torch.Generator().manual_seed(0)  # an unseeded permutation of 8 can keep the classes apart
    centers = F.normalize(torch.randn(2, P, generator=g), dim=-1)
    clustered = F.normalize(centers[LABELS] + 0.05 * torch.randn(B, P, generator=g), dim=-1)
    mixed = torch.cat([torch.arange(0, B, 2), torch.arange(1, B, 2)])  # each class half of each cluster
    shuffled = clustered[mixed]
    assert crit({"proj": clustered}, LABELS) < crit({"proj": shuffled}, LABELS)


def test_supcon_without_positives_is_zero_not_nan() -> None:
    crit = build_criterion(make_cfg("supcon")).aux
    proj = F.normalize(torch.randn(2, P), dim=-1).requires_grad_(True)
    loss = crit({"proj": proj}, torch.tensor([0, 1]))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(proj.grad).all()


@pytest.mark.parametrize("aux", ["infonce", "infonce_bank"])
def test_image_clinical_contrast_rewards_matching_pairs(aux: str) -> None:
    crit = build_criterion(make_cfg(aux)).aux
    zi = torch.randn(B, D)
    aligned = {"z_image": zi, "z_clinical": zi + 0.05 * torch.randn(B, D)}
    mismatched = {"z_image": zi, "z_clinical": torch.randn(B, D)}
    assert crit(aligned, LABELS) < crit(mismatched, LABELS)


def test_view_contrast_rewards_agreeing_views() -> None:
    crit = build_criterion(make_cfg("views")).aux
    a = F.normalize(torch.randn(B, P), dim=-1)
    agree = torch.stack([a, F.normalize(a + 0.05 * torch.randn(B, P), dim=-1)], dim=1)
    disagree = torch.stack([a, F.normalize(torch.randn(B, P), dim=-1)], dim=1)
    assert crit({"proj_views": agree}, LABELS) < crit({"proj_views": disagree}, LABELS)


def test_bank_is_fixed_and_public() -> None:
    """Every site builds the same bank from a fixed seed; it is a buffer, never trained."""
    a, b = build_criterion(make_cfg("infonce_bank")).aux, build_criterion(make_cfg("infonce_bank")).aux
    assert torch.equal(a.bank, b.bank)
    assert not list(a.parameters())


def test_criterion_sums_its_parts() -> None:
    outputs = fake_outputs()
    loss, parts = build_criterion(make_cfg("prototype", weight=0.5))(outputs, LABELS)
    assert parts["aux"] > 0 and "branch" not in parts
    assert loss.item() == pytest.approx(parts["ce"] + 0.5 * parts["aux"], rel=1e-6)
    outputs["logits_image"] = torch.randn(B, 2)
    outputs["logits_clinical"] = torch.randn(B, 2)
    loss, parts = build_criterion(make_cfg("none", weight=0.0))(outputs, LABELS)
    assert set(parts) == {"ce", "branch", "loss"}
    assert loss.item() == pytest.approx(parts["ce"] + 0.5 * parts["branch"], rel=1e-6)


@pytest.mark.parametrize("aux", ["supcon", "infonce"])
def test_batch_coupled_loss_with_dp_is_refused(aux: str) -> None:
    with pytest.raises(ConfigError, match=rf"aux_loss={aux}.*privacy.enabled=true.*prototype.*infonce_bank"):
        build_criterion(make_cfg(aux, dp=True))
    build_criterion(make_cfg(aux, dp=False))  # without DP the in-batch losses stay available


def test_dp_safe_losses_are_accepted_with_dp() -> None:
    assert set(DP_SAFE_AUX) == {"none", "prototype", "infonce_bank", "views", "segmentation"}
    for aux in DP_SAFE_AUX:
        assert not build_criterion(make_cfg(aux, dp=True)).couples_batch


def test_the_default_model_trains_under_a_site_dp_policy() -> None:
    """A hospital bundle's privacy.yaml switches DP on: the default MM-CL config must still be
    trainable (issue 9), with its auxiliary contrastive term kept on and per-sample."""
    from shared.config import compose

    cfg = compose(["privacy.enabled=true"])
    assert cfg.model.name == "mmcl" and cfg.model.aux_weight > 0
    criterion = build_criterion(cfg)
    assert cfg.model.aux_loss in DP_SAFE_AUX and not criterion.couples_batch
