"""Per-sample gradient samplers for Opacus' hooks mode, registered with ``register_grad_sampler``.

Why our own (bench/bench_dp.py --steps, README "Differential privacy"): on our small CNNs the
per-sample gradients, not the noise or the accountant, are what a DP-SGD step pays for.

* ``LearnedScale`` and ``PrototypeHead`` have no Opacus sampler, so Opacus ran a torch.func
  vmap over the module every step; both have a closed form (a scalar scale: the sum of
  input x output-gradient; prototypes: the outer product through the L2 normalisation).
* Convolutions: Opacus unfolds every input (im2col through ``as_strided`` + copy), which is the
  slowest route for our two extremes: 1x1 convolutions (attention projections, CAM) need no
  unfold at all (a batched matmul), and large maps with few channels (the stem and first stage)
  are fastest as one grouped convolution-weight gradient with the batch as groups
  (``torch.nn.grad.conv{2,3}d_weight``), the trick Opacus ships but leaves unused. Small maps
  with many channels keep an im2col + batched matmul (``F.unfold`` for 2D, Opacus otherwise).
* Transposed convolutions (the segmentation decoder's upsampling, MONAI's UNet) have no Opacus
  sampler either; torch.func's vmap over the module fails on an empty Poisson batch (B=0) and
  DP-SGD must still take that step. A transposed convolution is the adjoint of a convolution,
  so its weight gradient is a convolution-weight gradient with input and output swapped.

Every sampler returns what Opacus' generic route (torch.func) returns; tests/test_dp_modes.py
checks that to 1e-5 per layer type and for whole models, and that a patient's clipped gradient
does not move when another patient in the batch changes. Import this module before wrapping a
model (client.privacy does): registration replaces Opacus' samplers process-wide.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import nn

from shared.models.blocks import LearnedScale, PrototypeHead

GROUPED_MIN_POSITIONS = 64  # output positions from which the batch-as-groups weight gradient wins (8x8 and up)
_WEIGHT_GRAD = {2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}
_CONV_TRANSPOSE = (nn.ConvTranspose2d, nn.ConvTranspose3d)


@register_grad_sampler(LearnedScale)
def learned_scale_grad_sample(layer: LearnedScale, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """d(gamma * x)/d gamma for patient i: the sum over its elements of x_i * dL_i/dy_i."""
    x = activations[0].to(backprops.dtype)
    return {layer.gamma: (x * backprops).flatten(1).sum(dim=1, keepdim=True)}


@register_grad_sampler(PrototypeHead)
def prototype_grad_sample(layer: PrototypeHead, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """logits = proj @ u.T / T with u = P / |P| (row-wise): dL_i/du = g_i proj_i^T / T, then through the
    normalisation dL_i/dP_k = (dL_i/du_k - u_k <u_k, dL_i/du_k>) / |P_k| (F.normalize's eps is never hit)."""
    proj = activations[0].to(backprops.dtype)
    p = layer.prototypes
    norm = p.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    u = p / norm
    d_u = torch.einsum("nk,nd->nkd", backprops, proj) / layer.temperature
    return {p: (d_u - u * (d_u * u).sum(dim=-1, keepdim=True)) / norm}


def _pointwise(layer: nn.Module) -> bool:
    return all(k == 1 for k in layer.kernel_size) and all(s == 1 for s in layer.stride) and \
        all(p == 0 for p in layer.padding) and all(d == 1 for d in layer.dilation)


@register_grad_sampler([nn.Conv2d, nn.Conv3d])
def conv_grad_sample(layer: nn.Conv2d | nn.Conv3d, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Per-sample conv weight/bias gradients by the cheapest exact route for the layer's shape (module doc)."""
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    if n == 0 or layer.groups != 1 or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        return compute_conv_grad_sample(layer, activations, backprops)
    ret = {}
    if layer.weight.requires_grad:
        out_ch, positions = backprops.shape[1], math.prod(backprops.shape[2:])
        dims = x.dim() - 2
        if _pointwise(layer):
            w = torch.bmm(backprops.reshape(n, out_ch, positions), x.reshape(n, x.shape[1], positions).transpose(1, 2))
        elif positions >= GROUPED_MIN_POSITIONS:
            w = _WEIGHT_GRAD[dims](x.reshape(1, n * x.shape[1], *x.shape[2:]), (n * out_ch, *layer.weight.shape[1:]),
                                   backprops.reshape(1, n * out_ch, *backprops.shape[2:]), layer.stride, layer.padding,
                                   layer.dilation, groups=n)
        elif dims == 2:
            cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
            w = torch.bmm(backprops.reshape(n, out_ch, positions), cols.transpose(1, 2))
        else:
            return compute_conv_grad_sample(layer, activations, backprops)
        ret[layer.weight] = w.reshape(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.flatten(2).sum(dim=2)
    return ret


@register_grad_sampler(list(_CONV_TRANSPOSE))
def conv_transpose_grad_sample(layer: nn.ConvTranspose2d | nn.ConvTranspose3d, activations: list[torch.Tensor],
                               backprops: torch.Tensor) -> dict:
    """Per-sample weight/bias gradients of ``y = conv_transpose(x, W)``.

    ``<y, g> = <x, conv(g, W)>``: W's gradient is the convolution-weight gradient of a convolution
    from ``g`` (the layer's output gradient) to ``x`` with the layer's stride, padding and
    dilation (its output_padding only adds rows of ``g`` no weight reaches), computed for the
    whole batch at once with the batch as groups. Grouped layers keep Opacus' torch.func route.
    """
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    ret = {}
    if layer.weight.requires_grad:
        if n == 0:
            ret[layer.weight] = torch.zeros((0, *layer.weight.shape), dtype=backprops.dtype, device=backprops.device)
        elif layer.groups != 1:
            return _functorch(layer, activations, backprops)
        else:
            in_ch, out_ch = layer.weight.shape[:2]
            w = _WEIGHT_GRAD[x.dim() - 2](backprops.reshape(1, n * out_ch, *backprops.shape[2:]),
                                          (n * in_ch, *layer.weight.shape[1:]), x.reshape(1, n * in_ch, *x.shape[2:]),
                                          layer.stride, layer.padding, layer.dilation, groups=n)
            ret[layer.weight] = w.reshape(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.flatten(2).sum(dim=2)
    return ret


def _functorch(layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    from opacus.grad_sample.functorch import ft_compute_per_sample_gradient

    return ft_compute_per_sample_gradient(layer, activations, backprops)
