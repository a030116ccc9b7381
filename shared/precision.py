"""Mixed precision for a site's local training (``federation.precision``), and where it is not safe.

* ``fp32``: no autocast.
* ``bf16``: ``torch.autocast(dtype=bfloat16)`` around the forward pass and the loss. bf16 has
  fp32's exponent range, so no loss scaling is needed; the weights, their ``.grad``, the optimizer
  state and everything that travels stay fp32. Under DP-SGD (Opacus, hooks mode) the per-sample
  gradients are computed in Opacus' backward hooks from the layers' bf16 activations and come out
  bf16 where a layer ran in bf16; ``Precision.step`` turns them to fp32 before the DP optimizer
  clips them, so the per-sample norms, the clipping, the sum and the noise are fp32 arithmetic on
  exactly the values that are summed: the sensitivity bound (hence epsilon) is unchanged, bf16
  only costs accuracy of each patient's gradient (about 10 % relative on MM-CL's worst tensor).
  Autocast computes every sample's rows on their own, so one patient's per-sample gradient does
  not depend on another's (tests/test_device.py).
* ``fp16``: autocast to float16 with ``torch.amp.GradScaler`` (fp16 underflows small gradients).
  Refused under DP-SGD: the scaler multiplies the loss by a dynamic factor S, so the gradients
  Opacus clips at C are S times the true ones (the true bound would be C/S and would change as S
  does), and the scaler skips a step when any gradient overflows, a decision that depends on one
  patient's data and is outside the accounting.

Evaluation stays fp32 (client.trainer.predict): the metrics and score histograms the server pools
do not depend on a site's hardware.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from shared.config import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def device_type(device: str) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"


class Precision:
    """The autocast context, the backward and the optimizer step of one site's training."""

    def __init__(self, precision: str, device: str, *, private: bool = False) -> None:
        if precision not in ("fp32", *DTYPES):
            raise ConfigError(f"config 'federation.precision' is '{precision}'; use fp32, bf16 or fp16")
        if precision == "fp16" and private:
            raise ConfigError("config 'federation.precision' is 'fp16' but this site trains under DP-SGD: the GradScaler's "
                              "loss scaling would be clipped with the per-sample gradients; use precision=bf16 or fp32")
        kind = device_type(device)
        if precision == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"config 'federation.precision' is 'bf16' but GPU {torch.cuda.get_device_name(device)} has no "
                              f"bf16 support; use precision=fp16 (without DP) or fp32")
        self.precision, self.device_type, self.private = precision, kind, private
        self.scaler = torch.amp.GradScaler(kind) if precision == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=DTYPES[self.precision])

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, module: nn.Module) -> None:
        if self.private and self.precision != "fp32":
            upcast_grad_samples(module)
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()


def upcast_grad_samples(module: nn.Module) -> None:
    """Opacus' per-sample gradients (``p.grad_sample``, a tensor or a list of them) as fp32, before clipping."""
    for p in module.parameters():
        gs = getattr(p, "grad_sample", None)
        if isinstance(gs, torch.Tensor) and gs.dtype != torch.float32:
            p.grad_sample = gs.float()
        elif isinstance(gs, list):
            p.grad_sample = [g.float() for g in gs]
