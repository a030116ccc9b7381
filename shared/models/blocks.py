"""Building blocks shared by the model families: image encoder, clinical encoder, heads.

Every block is DP-ready by construction (Opacus validates it without surgery): GroupNorm or
LayerNorm instead of BatchNorm, ReLU out of place, residual sums out of place, and nothing
that mixes samples across the batch axis. The image encoder comes from MONAI blocks
parametrised by ``spatial_dims`` so a 2D radiograph task and a 3D CT task share the code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

STEM_STRIDE = 2  # the stem halves the input: keeps a 64x64 MM-CL step well under 0.1 s on 2 CPU cores
ACT = ("relu", {"inplace": False})  # in-place ReLU breaks Opacus' backward hooks


def group_norm(channels: int) -> tuple[str, dict[str, int]]:
    """MONAI norm spec: GroupNorm with up to 8 groups (a divisor of ``channels``)."""
    groups = max(g for g in (8, 4, 2, 1) if channels % g == 0)
    return ("group", {"num_groups": groups})


class CamEnhancement(nn.Module):
    """CAM-style attention: a 1x1 conv classifier scores every position for every class.

    The class activation map is normalised with a softmax over the SPATIAL positions of one
    sample (the published MM-CL code normalises over the batch axis, which couples patients
    and breaks DP-SGD); the class-averaged map, rescaled to mean 1, re-weights the features
    so that the regions that drive the decision are amplified: ``f * (1 + m)``.
    The pooled map is returned as CAM logits so the map itself can be supervised.
    """

    def __init__(self, spatial_dims: int, channels: int, n_classes: int) -> None:
        super().__init__()
        self.cam = Convolution(spatial_dims, channels, n_classes, kernel_size=1, conv_only=True)

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cam = self.cam(feat)  # [B, K, *spatial]
        flat = cam.flatten(2)  # [B, K, N]
        n_pos = flat.shape[-1]
        attn = torch.softmax(flat, dim=-1).mean(dim=1, keepdim=True) * n_pos  # [B, 1, N], mean 1
        mask = attn.reshape(feat.shape[0], 1, *feat.shape[2:])
        return feat * (1.0 + mask), flat.mean(dim=-1)


class NonLocalBlock(nn.Module):
    """Non-local block (Wang et al. 2018): self-attention over the spatial positions of one sample.

    Embedded-Gaussian form with 1x1 convolutions for theta/phi/g and the output projection,
    split into ``heads``; the softmax runs over the positions of the same sample and the
    residual sum is out of place, so Opacus' hooks see every activation and no patient's
    features reach another's.
    """

    def __init__(self, spatial_dims: int, channels: int, heads: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"non-local block: {channels} channels not divisible by {heads} heads (model.nonlocal_heads)")
        self.heads = heads
        self.norm = nn.GroupNorm(group_norm(channels)[1]["num_groups"], channels)
        self.qkv = Convolution(spatial_dims, channels, 3 * channels, kernel_size=1, conv_only=True)
        self.out = Convolution(spatial_dims, channels, channels, kernel_size=1, conv_only=True)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        b, c, n = feat.shape[0], feat.shape[1], math.prod(feat.shape[2:])  # explicit N: an empty Poisson batch has B=0
        qkv = self.qkv(self.norm(feat)).reshape(b, 3, self.heads, c // self.heads, n)  # [B, 3, h, d, N]
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        attn = torch.softmax(torch.einsum("bhdn,bhdm->bhnm", q, k) * (c // self.heads) ** -0.5, dim=-1)
        y = torch.einsum("bhnm,bhdm->bhdn", attn, v).reshape(feat.shape)
        return feat + self.out(y)


class ImageEncoder(nn.Module):
    """CNN image branch: conv stem, strided residual stages, CAM enhancement, non-local block.

    Args:
        spatial_dims: 2 for radiographs, 3 for CT volumes.
        width: channels of the stem; stage ``i`` has ``width * 2**i`` channels and halves the size.
        stages: number of strided residual stages (after a stride-2 stem: 64x64 -> 4x4 with 3 stages).
        embed_dim: size of the pooled image embedding.
        n_classes: classes scored by the CAM classifier.
        nonlocal_heads: heads of the non-local self-attention.
        enhance: whether to use CAM enhancement and the non-local block (MM-CL); a plain CNN
            otherwise (the late-fusion image branch).
    """

    def __init__(
        self,
        spatial_dims: int,
        width: int,
        stages: int,
        embed_dim: int,
        n_classes: int,
        nonlocal_heads: int,
        in_channels: int = 1,
        enhance: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            Convolution(spatial_dims, in_channels, width, strides=STEM_STRIDE, kernel_size=3, act=ACT, norm=group_norm(width))
        ]
        ch = width
        for i in range(stages):
            out = width * 2**i
            layers.append(
                ResidualUnit(spatial_dims, ch, out, strides=2, kernel_size=3, subunits=2, act=ACT, norm=group_norm(out))
            )
            ch = out
        self.features = nn.Sequential(*layers)
        self.cam = CamEnhancement(spatial_dims, ch, n_classes) if enhance else None
        self.nonlocal_block = NonLocalBlock(spatial_dims, ch, nonlocal_heads) if enhance else None
        self.embed = nn.Sequential(nn.Linear(ch, embed_dim), nn.LayerNorm(embed_dim))

    @property
    def channels(self) -> int:
        """Channels of the feature map ``feature_map`` returns."""
        return self.embed[0].in_features

    def feature_map(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The (CAM-enhanced, non-local) feature map [B, C, *spatial] and the CAM logits [B, K]."""
        feat = self.features(image)
        cam_logits = None
        if self.cam is not None and self.nonlocal_block is not None:
            feat, cam_logits = self.cam(feat)
            feat = self.nonlocal_block(feat)
        return feat, cam_logits

    def embed_map(self, feat: torch.Tensor) -> torch.Tensor:
        """Global average pool + projection to the image embedding [B, embed_dim]."""
        return self.embed(feat.flatten(2).mean(dim=-1))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the image embedding [B, embed_dim] and the CAM logits [B, K] (None without CAM)."""
        feat, cam_logits = self.feature_map(image)
        return self.embed_map(feat), cam_logits


class LearnedScale(nn.Module):
    """``gamma * x`` with a learnable scalar gamma, zero at init (the residual branch starts off).

    Its own module with one tensor in and one out, so Opacus gives gamma a per-sample gradient (a
    bare parameter inside a module with child layers would not get one); client.grad_samplers
    registers its closed form (sum of x * dL/dy per patient) instead of Opacus' torch.func fallback.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * x


class VisualClinicalFusion(nn.Module):
    """MM-CL's Visual-text Feature Fusion: self-attention over the visual map concatenated with
    the clinical embedding broadcast to every position.

    As in the published VTFM (a SAGAN-style block): the clinical vector is tiled over the
    spatial positions and stacked with the visual channels, so each position's query and key
    hold both modalities and the attention weights model which image regions matter for this
    patient's clinical profile (visual<->clinical correlations, not a per-feature mix); value is
    a 1x1 conv of the stacked map, the output ``x + gamma * attn(x)`` starts as identity
    (gamma = 0), and global average pooling gives the fused vector. GroupNorm (not the
    published BatchNorm) and a softmax over the positions of one sample keep it per-sample.
    """

    def __init__(self, spatial_dims: int, vis_channels: int, clin_dim: int, reduction: int = 8) -> None:
        super().__init__()
        ch = vis_channels + clin_dim
        inner = max(ch // reduction, 4)
        self.out_dim = ch
        self.norm = nn.GroupNorm(group_norm(ch)[1]["num_groups"], ch)
        self.query = Convolution(spatial_dims, ch, inner, kernel_size=1, conv_only=True)
        self.key = Convolution(spatial_dims, ch, inner, kernel_size=1, conv_only=True)
        self.value = Convolution(spatial_dims, ch, ch, kernel_size=1, conv_only=True)
        self.scale = LearnedScale()

    def forward(self, feat: torch.Tensor, z_clinical: torch.Tensor) -> torch.Tensor:
        # explicit sizes, never -1: an empty Poisson batch under DP-SGD has B=0 and must still run
        b, n = feat.shape[0], math.prod(feat.shape[2:])
        tiled = z_clinical.reshape(b, z_clinical.shape[1], *([1] * (feat.dim() - 2))).expand(-1, -1, *feat.shape[2:])
        x = torch.cat([feat, tiled], dim=1)
        h = self.norm(x)
        q, k, v = self.query(h), self.key(h), self.value(h)
        q, k, v = q.reshape(b, q.shape[1], n), k.reshape(b, k.shape[1], n), v.reshape(b, v.shape[1], n)
        attn = torch.softmax(torch.einsum("bcn,bcm->bnm", q, k) * q.shape[1] ** -0.5, dim=-1)
        y = torch.einsum("bnm,bcm->bcn", attn, v)
        return (x.reshape(b, x.shape[1], n) + self.scale(y)).mean(dim=-1)


class ClinicalEncoder(nn.Module):
    """MLP on the standardised clinical vector: Linear -> LayerNorm -> ReLU -> Dropout -> Linear."""

    def __init__(self, n_clinical: int, hidden: int, embed_dim: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_clinical, hidden),
            nn.LayerNorm(hidden),
            nn.ReLU(inplace=False),
            nn.Dropout(dropout),
            nn.Linear(hidden, embed_dim),
            nn.LayerNorm(embed_dim),
        )

    def forward(self, clinical: torch.Tensor) -> torch.Tensor:
        return self.net(clinical)


class ProjectionHead(nn.Module):
    """MLP to the L2-normalised space the auxiliary contrastive loss works in."""

    def __init__(self, in_dim: int, proj_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=False), nn.Linear(in_dim, proj_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


class ViewAugment(nn.Module):
    """A second view of each image, drawn inside the model: random flip, intensity scale, noise.

    Every random draw is per sample, so a patient's view depends on that patient's image alone
    (the view contrast stays per-sample, DP-safe). No parameters; runs in eval mode too, where it
    only feeds the auxiliary loss value, never the logits.
    """

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        shape = (image.shape[0],) + (1,) * (image.dim() - 1)
        flip = torch.rand(shape, device=image.device) < 0.5
        view = torch.where(flip, image.flip(-1), image)
        scale = 1.0 + 0.2 * (torch.rand(shape, device=image.device) - 0.5)
        return view * scale + 0.03 * torch.randn_like(image)


class PrototypeHead(nn.Module):
    """Cosine similarity of a projection to learnable class prototypes, divided by a temperature.

    The prototypes live in the model (not the loss) for two reasons: Opacus clips and noises
    their per-sample gradients like any other weight (a prototype trained outside the
    private model would learn from the batch without noise), and FedAvg aggregates them with
    the rest of the model. The module takes one tensor and returns one, so Opacus computes
    its per-sample gradients (the closed form client.grad_samplers registers).
    """

    def __init__(self, proj_dim: int, n_classes: int, temperature: float) -> None:
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(n_classes, proj_dim))
        self.temperature = temperature

    def forward(self, proj: torch.Tensor) -> torch.Tensor:
        return proj @ F.normalize(self.prototypes, dim=-1).t() / self.temperature
