"""Device choice and mixed precision (shared.precision) on CPU: no test needs a GPU."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from client.trainer import build_screener, make_loader, train_local
from shared.config import ConfigError, compose, resolve_device
from shared.precision import Precision, upcast_grad_samples

OVERRIDES = ["model=mmcl", "task.image_size=[32,32]", "model.aux_loss=prototype"]


@pytest.fixture(scope="module")
def cfg():
    return compose(OVERRIDES)


def clinical_width(screener) -> int:
    return next(m for m in screener.net.clinical.modules() if isinstance(m, nn.Linear)).in_features


def toy_data(screener, n: int = 32, seed: int = 0) -> list[dict]:
    """Separable patients: the label brightens the image and shifts the first clinical column."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.rand(n, 1, 32, 32, generator=g) * 0.5 + labels.view(-1, 1, 1, 1) * 0.4
    clinical = torch.randn(n, clinical_width(screener), generator=g)
    clinical[:, 0] += 2 * labels
    return [{"image": images[i], "clinical": clinical[i], "label": labels[i]} for i in range(n)]


def test_auto_picks_cuda_where_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    assert resolve_device(None) == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device("cuda:0")


def test_bf16_trains_under_autocast_and_keeps_fp32_weights(cfg):
    torch.manual_seed(0)
    screener = build_screener(cfg)
    data = toy_data(screener)
    fed = cfg.federation.__class__(**{**vars(cfg.federation), "precision": "bf16", "lr": 3e-3, "batch_size": 8})
    seen: list[torch.dtype] = []
    hook = screener.net.register_forward_hook(lambda mod, args, out: seen.append(out["logits"].dtype))
    first = train_local(screener, make_loader(data, 8, shuffle=True, seed=0), fed, "cpu", epochs=1)
    for _ in range(4):
        last = train_local(screener, make_loader(data, 8, shuffle=True, seed=0), fed, "cpu", epochs=1)
    hook.remove()
    assert set(seen) == {torch.bfloat16}  # the forward really ran in bf16 (the flag is not a no-op)
    assert last.train_loss < first.train_loss
    assert all(v.dtype in (torch.float32, torch.int64) for v in screener.state_dict().values())  # what travels


def per_sample_grads(gsm: GradSampleModule, screener, batch: list[dict], amp: Precision) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)  # the same dropout masks on every call
    gsm.zero_grad(set_to_none=True)
    for p in gsm.parameters():
        p.grad_sample = None
    images = torch.stack([b["image"] for b in batch])
    clinical = torch.stack([b["clinical"] for b in batch])
    labels = torch.stack([b["label"] for b in batch])
    with amp.autocast():
        loss, _ = screener.criterion(gsm(images, clinical), labels)
    amp.backward(loss)
    return {n: p.grad_sample for n, p in gsm.named_parameters() if p.requires_grad}


def test_bf16_per_sample_gradients_stay_independent_and_are_clipped_in_fp32(cfg):
    torch.manual_seed(0)
    screener = build_screener(cfg)
    gsm = GradSampleModule(screener, batch_first=True, loss_reduction="mean", strict=True)
    amp = Precision("bf16", "cpu", private=True)
    batch = toy_data(screener, n=4)
    before = per_sample_grads(gsm, screener, batch, amp)
    assert any(g.dtype == torch.bfloat16 for g in before.values())  # Opacus' hooks return bf16 under autocast
    upcast_grad_samples(gsm)
    assert all(p.grad_sample.dtype == torch.float32 for p in gsm.parameters() if p.requires_grad)
    other = [dict(b) for b in batch]
    other[1] = toy_data(screener, n=4, seed=7)[2]  # replace patient 1 by someone else
    after = per_sample_grads(gsm, screener, other, amp)
    for name, g in before.items():
        assert torch.equal(g[0].float(), after[name][0].float()), name  # patient 0's gradient did not move
    assert any(not torch.equal(g[1].float(), after[n][1].float()) for n, g in before.items())


def test_fp16_refused_under_dp(cfg):
    with pytest.raises(ConfigError, match="DP-SGD"):
        Precision("fp16", "cpu", private=True)
    with pytest.raises(ConfigError, match="federation.precision"):
        compose(OVERRIDES + ["privacy=eps8", "federation.precision=fp16"])
    assert Precision("fp16", "cpu").scaler is not None  # without DP: a GradScaler


def test_simulated_sites_get_a_gpu_share_where_one_is_present(monkeypatch):
    from simulation import runner

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 4)
    assert runner.backend_config(compose([]))["client_resources"]["num_gpus"] == 0.25  # 4 sites at once share it
    assert runner.backend_config(compose(["device=cpu"]))["client_resources"]["num_gpus"] == 0.0
    assert runner.backend_config(compose(["federation.client_gpus=0.5"]))["client_resources"]["num_gpus"] == 0.5
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert runner.backend_config(compose([]))["client_resources"]["num_gpus"] == 0.0
