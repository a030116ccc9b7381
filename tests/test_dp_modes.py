"""fedmsk's per-sample gradient samplers (client.grad_samplers) in Opacus' hooks mode: each patient's
gradient and clipped contribution equal the per-patient reference, and no other patient moves them."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

import client.grad_samplers  # noqa: F401  (registers the samplers, as client.privacy does)
import opacus.grad_sample.grad_sample_module as gsm_mod
from client.trainer import build_screener
from shared.clinical import feature_names
from shared.config import compose

SMALL = ["model.width=4", "model.embed_dim=16", "model.proj_dim=8", "model.clinical_hidden=8", "model.dropout=0",
         "model.aux_weight=0.5"]
# 16x16 MM-CL: stem 8x8 output (batch-as-groups route), stages at 4x4 and 2x2 (im2col route), 1x1 attention
# projections (matmul route); 3D fracture model at 16^3: the 3D grouped route and Opacus' 3D unfold
MODELS = {
    "mmcl": ["model=mmcl", "task.image_size=[16,16]", "model.aux_loss=prototype"],
    "late_fusion": ["model=late_fusion", "task.image_size=[16,16]", "model.aux_loss=prototype"],
    "fracture3d": ["task=vertebral_fracture", "model=fracture3d", "task.image_size=[16,16,16]", "model.aux_loss=prototype"],
    # the U-Net decoder's transposed convolutions (client.grad_samplers.conv_transpose_grad_sample)
    "segclass": ["task=osteoporosis_hand", "model=segclass", "task.image_size=[16,16]", "model.aux_loss=segmentation"],
}


def setup(name: str, n: int = 6, seed: int = 0):
    """A small model of ``name`` moved off its init (the zero-initialised residual scale and clinical
    read-out would hide gradients) and a batch of ``n`` patients, in float64: in float32 a batch of one
    and a batch of six already differ by 5e-4 (relative) through the convolutions' own rounding."""
    cfg = compose(SMALL + MODELS[name])
    torch.manual_seed(1)
    screener = build_screener(cfg).double()
    with torch.no_grad():
        for p in screener.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 1, *cfg.task.image_size, generator=g, dtype=torch.float64)
    if name == "segclass":  # the mask rides in one-hot channels after the image (shared.masks)
        n_seg = screener.net.n_seg
        mask = torch.randint(0, n_seg, (n, *cfg.task.image_size), generator=g)
        image = torch.cat([image, torch.nn.functional.one_hot(mask, n_seg).movedim(-1, 1).double()], dim=1)
    clinical = torch.randn(n, len(feature_names(cfg.task)), generator=g, dtype=torch.float64)
    classes = screener(image[:1], clinical[:1])["logits"].shape[1]
    return screener, (image, clinical, (torch.arange(n) + seed) % classes)


def hooks_grads(screener, batch) -> torch.Tensor:
    """[B, n_params] per-sample gradients by Opacus' hooks with fedmsk's samplers."""
    image, clinical, labels = batch
    gsm = GradSampleModule(screener)
    loss, _ = screener.criterion(gsm(image, clinical), labels)
    loss.backward()
    rows = torch.cat([p.grad_sample.reshape(len(labels), -1) for p in screener.parameters()], dim=1)
    gsm._close()
    screener.zero_grad(set_to_none=True)
    return rows


def reference_grads(screener, batch) -> torch.Tensor:
    """The definition: patient i's gradient is the gradient of patient i's own loss, alone in its batch."""
    image, clinical, labels = batch
    params = list(screener.parameters())
    rows = []
    for i in range(len(labels)):
        loss, _ = screener.criterion(screener(image[i : i + 1], clinical[i : i + 1]), labels[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


@pytest.mark.parametrize("name", list(MODELS))
def test_per_sample_gradients_match_the_reference(name: str) -> None:
    screener, batch = setup(name)
    ours, ref = hooks_grads(screener, batch), reference_grads(screener, batch)
    scale = ref.abs().amax(dim=1, keepdim=True)
    assert ((ours - ref).abs() / scale).max() < 1e-9


def test_no_layer_falls_back_to_functorch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every MM-CL layer has a closed-form sampler: Opacus' per-module torch.func vmap (its fallback for
    modules it does not know, e.g. LearnedScale and PrototypeHead) never runs."""
    def refuse(layer, *_):
        raise AssertionError(f"functorch fallback for {type(layer).__name__}")

    monkeypatch.setattr(gsm_mod, "ft_compute_per_sample_gradient", refuse)
    screener, batch = setup("mmcl")
    assert hooks_grads(screener, batch).abs().sum() > 0


def clipped_contributions(screener, batch, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patient's clipped gradient, and the averaged clipped gradient Opacus' optimizer forms (no noise)."""
    image, clinical, labels = batch
    gsm = GradSampleModule(screener)
    opt = DPOptimizer(torch.optim.SGD(screener.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=clip,
                      expected_batch_size=len(labels))
    loss, _ = screener.criterion(gsm(image, clinical), labels)
    loss.backward()
    per = torch.cat([p.grad_sample.reshape(len(labels), -1) for p in screener.parameters()], dim=1)
    opt.pre_step()  # clip, sum, (zero) noise, scale: p.grad is what the step applies
    mean = torch.cat([p.grad.reshape(-1) for p in screener.parameters()])
    gsm._close()
    factor = (clip / (per.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)
    return per * factor, mean


def test_clipped_gradient_matches_the_reference() -> None:
    screener, batch = setup("mmcl")
    ref = reference_grads(screener, batch)
    clip = float(ref.norm(dim=1).median())  # some patients clipped, some not
    expected = (ref * (clip / (ref.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)).mean(dim=0)  # Opacus' 1e-6
    _, mean = clipped_contributions(screener, batch, clip)
    assert ((mean - expected).abs().max() / expected.abs().max()) < 1e-9


@pytest.mark.parametrize("name", ["mmcl", "fracture3d"])
def test_one_patients_contribution_ignores_the_others(name: str) -> None:
    """Replacing patient 3 (image, clinical record, label) leaves every other patient's clipped gradient."""
    screener, batch = setup(name)
    base, _ = clipped_contributions(screener, batch, clip=0.5)
    other = setup(name, seed=9)[1]
    image, clinical, labels = (t.clone() for t in batch)
    classes = screener(image[:1], clinical[:1])["logits"].shape[1]
    image[3], clinical[3], labels[3] = other[0][3], other[1][3], (labels[3] + 1) % classes
    moved, _ = clipped_contributions(screener, (image, clinical, labels), clip=0.5)
    keep = [i for i in range(len(labels)) if i != 3]
    assert (moved[3] - base[3]).abs().max() > 1e-3  # the replaced patient did change
    assert ((moved[keep] - base[keep]).abs().max() / base[keep].abs().max()) < 1e-9
