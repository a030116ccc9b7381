"""Model registry: shapes, gradients, per-sample independence, Opacus validity, pretrained weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from shared.config import ConfigError, FedmskConfig, ModelConfig, TaskConfig
from shared.models import MODELS, build_model

N_CLIN = 5
# every registered model, plus the heads each auxiliary loss makes it build
CASES = [
    ("mmcl", "none"),
    ("mmcl", "supcon"),
    ("mmcl", "prototype"),
    ("mmcl", "infonce_bank"),
    ("mmcl", "views"),
    ("image_only", "prototype"),
    ("image_only", "views"),
    ("clinical_only", "supcon"),
    ("logreg", "none"),
    ("late_fusion", "none"),
    ("late_fusion", "prototype"),
    ("fracture3d", "supcon"),
    ("fracture3d", "prototype"),
    ("segclass", "segmentation"),
    ("wavelet_fusion", "none"),
    ("wavelet_fusion", "prototype"),
]


def make_cfg(name: str, aux: str = "none", *, dims: int = 2, size: int = 32, seed: int = 0, **model: object) -> FedmskConfig:
    task = TaskConfig(name="t", label_column="y", spatial_dims=dims, image_size=[size] * dims)
    return FedmskConfig(seed=seed, task=task, model=ModelConfig(name=name, aux_loss=aux, aux_weight=0.3 if aux != "none" else 0.0, **model))  # type: ignore[arg-type]


def batch(n: int = 6, dims: int = 2, size: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, *[size] * dims, generator=g), torch.randn(n, N_CLIN, generator=g)


def test_every_registered_model_is_covered() -> None:
    assert {name for name, _ in CASES} == set(MODELS)


@pytest.mark.parametrize(("name", "aux"), CASES)
def test_forward_backward_shapes_and_gradients(name: str, aux: str) -> None:
    cfg = make_cfg(name, aux)
    model = off_init(build_model(cfg, n_clinical=N_CLIN))
    image, clinical = batch()
    out = model(image, clinical)
    assert out["logits"].shape == (6, 2)
    for key in ("z_image", "z_clinical"):
        if key in out:
            assert out[key].shape == (6, cfg.model.embed_dim)
    if aux in ("supcon", "prototype"):
        assert out["proj"].shape == (6, cfg.model.proj_dim)
        assert torch.allclose(out["proj"].norm(dim=-1), torch.ones(6), atol=1e-5)
    if aux == "prototype":
        assert out["proto_logits"].shape == (6, 2)
    if aux == "views":
        assert out["proj_views"].shape == (6, 2, cfg.model.proj_dim)
        assert not torch.allclose(out["proj_views"][:, 0], out["proj_views"][:, 1])  # two different views
    torch.manual_seed(3)  # a random linear read-out: its gradient does not vanish at a zero init (logreg)
    loss = sum((v.float() * torch.randn_like(v.float())).sum() for v in out.values() if v is not None)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient reaches {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient in {pname}"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient in {pname}"


@pytest.mark.parametrize(("name", "aux"), CASES)
def test_an_empty_batch_runs(name: str, aux: str) -> None:
    """Poisson sampling under DP-SGD draws empty batches; every model must take them (B=0)."""
    dims = 3 if name == "fracture3d" else 2
    cfg = make_cfg(name, aux, dims=dims, size=16)
    model = build_model(cfg, n_clinical=N_CLIN)
    image, clinical = batch(0, dims=dims, size=16)
    out = model(image, clinical)
    assert out["logits"].shape == (0, 2)
    sum(v.float().sum() for v in out.values() if v is not None).backward()


@pytest.mark.parametrize(("name", "aux"), CASES)
def test_an_empty_batch_gives_every_weight_a_per_sample_gradient(name: str, aux: str) -> None:
    """The criterion's zero loss of an empty batch reaches every weight, so Opacus' noisy step
    finds a (B=0) per-sample gradient on each; one it misses makes the step raise."""
    import client.grad_samplers  # noqa: F401  (fedmsk's samplers, as the sites register them)
    from opacus import GradSampleModule

    from shared.losses import build_criterion

    dims = 3 if name == "fracture3d" else 2
    cfg = make_cfg(name, aux, dims=dims, size=16)
    model = GradSampleModule(build_model(cfg, n_clinical=N_CLIN))
    image, clinical = batch(0, dims=dims, size=16)
    loss, _ = build_criterion(cfg)(model(image, clinical), torch.zeros(0, dtype=torch.long))
    loss.backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad_sample is not None, f"{name}/{aux}: the empty batch's loss does not reach {pname}"
            assert p.grad_sample.shape == (0, *p.shape)


def off_init(model: nn.Module) -> nn.Module:
    """Move every weight off its init: zero-initialised parts (logreg, the fusion's residual
    scale gamma, the clinical read-out) block gradients or inputs only at the init itself."""
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_late_fusion_logits_are_log_probabilities() -> None:
    model = build_model(make_cfg("late_fusion"), n_clinical=N_CLIN)
    out = model(*batch())
    assert torch.allclose(out["logits"].exp().sum(dim=-1), torch.ones(6), atol=1e-5)


def outputs_of(model: nn.Module, image: torch.Tensor, clinical: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)  # same dropout masks in both passes
    with torch.no_grad():
        return {k: v for k, v in model(image, clinical).items() if v is not None}


def changed_rows(model: nn.Module, j: int = 2) -> set[int]:
    """Rows whose outputs change when only sample j's image and clinical vector are replaced."""
    image, clinical = batch()
    image2, clinical2 = image.clone(), clinical.clone()
    image2[j] = torch.rand_like(image2[j])
    clinical2[j] = torch.randn_like(clinical2[j]) * 3
    a, b = outputs_of(model, image, clinical), outputs_of(model, image2, clinical2)
    rows: set[int] = set()
    for key in a:
        diff = (a[key] - b[key]).abs().reshape(a[key].shape[0], -1).amax(dim=1)
        rows |= {i for i in range(diff.shape[0]) if diff[i] > 1e-6}
    return rows


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(("name", "aux"), CASES)
def test_forward_is_per_sample(name: str, aux: str, mode: str) -> None:
    model = off_init(build_model(make_cfg(name, aux), n_clinical=N_CLIN))  # every output depends on the inputs
    model.train(mode == "train")
    assert changed_rows(model, j=2) == {2}


def test_independence_check_catches_batch_mixing() -> None:
    """The check above must be able to fail: BatchNorm in train mode mixes the batch."""

    class Mixing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(N_CLIN)
            self.fc = nn.Linear(N_CLIN, 2)

        def forward(self, image: torch.Tensor, clinical: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.fc(self.bn(clinical))}

    assert changed_rows(Mixing().train(), j=2) == set(range(6))


@pytest.mark.parametrize(("name", "aux"), CASES)
def test_opacus_validator_is_clean(name: str, aux: str) -> None:
    model = build_model(make_cfg(name, aux), n_clinical=N_CLIN)
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_3d_volumes_use_the_same_code() -> None:
    model = build_model(make_cfg("mmcl", "prototype", dims=3, size=16), n_clinical=N_CLIN)
    image, clinical = batch(n=3, dims=3, size=16)
    out = model(image, clinical)
    assert out["logits"].shape == (3, 2)
    assert any(isinstance(m, nn.Conv3d) for m in model.modules())
    assert ModuleValidator.validate(model, strict=False) == []


def test_init_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    a = build_model(make_cfg("mmcl", seed=3), n_clinical=N_CLIN)
    assert torch.equal(torch.rand(1), before)
    b = build_model(make_cfg("mmcl", seed=3), n_clinical=N_CLIN)
    c = build_model(make_cfg("mmcl", seed=4), n_clinical=N_CLIN)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_pretrained_round_trip(tmp_path: Path) -> None:
    src = build_model(make_cfg("mmcl", "prototype", seed=5), n_clinical=N_CLIN)
    path = tmp_path / "mmcl.pt"
    torch.save(src.state_dict(), path)
    loaded = build_model(make_cfg("mmcl", "prototype", seed=0, pretrained_path=str(path)), n_clinical=N_CLIN)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in src.state_dict().items())
    image, clinical = batch()
    src.eval(), loaded.eval()
    assert torch.equal(src(image, clinical)["logits"], loaded(image, clinical)["logits"])


def test_pretrained_wrong_or_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    wrong = tmp_path / "logreg.pt"
    torch.save(build_model(make_cfg("logreg"), n_clinical=N_CLIN).state_dict(), wrong)
    with pytest.raises(ConfigError, match=r"logreg\.pt.*does not fit model 'mmcl'.*missing"):
        build_model(make_cfg("mmcl", pretrained_path=str(wrong)), n_clinical=N_CLIN)
    narrow = tmp_path / "narrow.pt"
    torch.save(build_model(make_cfg("mmcl", width=8), n_clinical=N_CLIN).state_dict(), narrow)
    with pytest.raises(ConfigError, match=r"narrow\.pt.*shape mismatch"):
        build_model(make_cfg("mmcl", pretrained_path=str(narrow)), n_clinical=N_CLIN)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"junk\.pt.*not a readable"):
        build_model(make_cfg("mmcl", pretrained_path=str(junk)), n_clinical=N_CLIN)
    with pytest.raises(ConfigError, match=r"absent\.pt: no such file"):
        build_model(make_cfg("mmcl", pretrained_path=str(tmp_path / "absent.pt")), n_clinical=N_CLIN)


def test_aux_loss_the_model_cannot_feed_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"infonce.*z_clinical.*image_only"):
        build_model(make_cfg("image_only", "infonce"), n_clinical=N_CLIN)
    with pytest.raises(ConfigError, match=r"logreg"):
        build_model(make_cfg("logreg", "prototype"), n_clinical=N_CLIN)


def test_aux_heads_only_when_the_loss_reads_them() -> None:
    plain = build_model(make_cfg("mmcl", "none"), n_clinical=N_CLIN)
    assert "proj" not in plain(*batch())
    weightless = make_cfg("mmcl", "supcon")
    weightless.model.aux_weight = 0.0
    assert "proj" not in build_model(weightless, n_clinical=N_CLIN)(*batch())


def test_real_config_builds_from_the_task_alone() -> None:
    """The server builds the model before any data is seen: the clinical width comes from the task."""
    from shared.clinical import feature_names
    from shared.config import compose

    cfg = compose(["model=mmcl"])
    model = build_model(cfg)
    assert model.clinical.net[0].in_features == len(feature_names(cfg.task))
    image = torch.rand(2, 1, *cfg.task.image_size)
    assert model(image, torch.randn(2, len(feature_names(cfg.task))))["logits"].shape == (2, len(cfg.task.classes))


def test_gate_fusion_ablation_builds_and_stays_per_sample() -> None:
    model = off_init(build_model(make_cfg("mmcl", "prototype", fusion="gate"), n_clinical=N_CLIN))
    assert not any(type(m).__name__ == "VisualClinicalFusion" for m in model.modules())
    assert changed_rows(model.train(), j=2) == {2}
    assert ModuleValidator.validate(model, strict=False) == []


def test_fusion_attends_over_image_positions_with_the_clinical_profile() -> None:
    """VTFM: the clinical embedding takes part in the attention over the image map, so a patient's
    clinical vector changes how its *visual* channels are pooled (once gamma leaves zero)."""
    from shared.models.blocks import VisualClinicalFusion

    torch.manual_seed(0)
    fusion = VisualClinicalFusion(2, vis_channels=16, clin_dim=8)
    feat, z1, z2 = torch.randn(2, 16, 4, 4), torch.randn(2, 8), torch.randn(2, 8)
    with torch.no_grad():
        assert torch.allclose(fusion(feat, z1)[:, :16], fusion(feat, z2)[:, :16])  # gamma = 0: identity at init
        fusion.scale.gamma.fill_(1.0)
        assert not torch.allclose(fusion(feat, z1)[:, :16], fusion(feat, z2)[:, :16], atol=1e-4)
