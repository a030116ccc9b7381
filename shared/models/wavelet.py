"""Wavelet-attention image branch + clinical model, fused by a learned weighting of their probabilities.

After the chest-radiograph osteoporosis model of Tang et al. (JMIR Med Inform 2025): a CNN image
model whose features are combined with wavelet features under attention "to focus on key
regions", a clinical model, and late probability fusion. Bone loss shows as thinner cortices
and a coarser, more porous trabecular texture: fine detail that a strided CNN stem averages
away but that a wavelet decomposition keeps in its detail sub-bands.

- ``HaarBank``: a fixed two-level orthonormal Haar filter bank (a stride-2 convolution with
  constant 2x2 filters held as a buffer, so it has no parameters, is differentiable, and Opacus
  has nothing to hook). Haar is written out because its four 2x2 filters are the definition;
  PyWavelets would add a dependency for eight numbers.
- ``SubbandAttention``: per patient, a softmax over the sub-bands from their log-energies
  (which frequency bands matter for this image), rescaled so the weights average 1.
- The wavelet stream (weighted sub-bands -> MONAI convolutions) is stacked with the MONAI CNN
  backbone's feature map (``blocks.ImageEncoder``), and ``RegionAttention`` pools it with a
  softmax over the positions of one image (which regions matter).
- The clinical model is ``blocks.ClinicalEncoder`` with its own classifier; the two branch
  probabilities are mixed by ``late_fusion.ProbabilityMix`` (w = sigmoid(alpha), learned).

Everything is per sample (GroupNorm/LayerNorm, softmaxes over one sample's bands or positions,
explicit sizes so an empty Poisson batch runs), so every part trains under per-sample DP-SGD.
The branch logits are outputs (``logits_image``, ``logits_clinical``): the loss supervises each
branch, and an evaluation can score image-only, clinical-only and fused predictions of the
same patients from one model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from shared.models.blocks import ACT, ClinicalEncoder, ImageEncoder, group_norm
from shared.models.late_fusion import ProbabilityMix, late_fusion_outputs
from shared.models.spec import AuxHeads, ModelSpec

BANDS = ("LL", "LH", "HL", "HH")  # approximation, horizontal, vertical, diagonal detail
MIX_GAIN = 10.0  # w = sigmoid(MIX_GAIN * alpha): see ScaledProbabilityMix


class ScaledProbabilityMix(ProbabilityMix):
    """``late_fusion.ProbabilityMix`` with w = sigmoid(MIX_GAIN * alpha).

    One scalar among ~10^5 weights at the branches' learning rate (Adam 0.001) moves w by about
    0.0003 a step: in the chest benchmark's 8 epochs it stayed at 0.49-0.51 (measured), so the
    "learned" weight was the fixed 0.5 start. The gain gives it the branches' pace; still one
    tensor in and one out (Opacus computes alpha's per-sample gradient through functorch).
    """

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(MIX_GAIN * self.alpha)
        return w * probs[:, 0] + (1.0 - w) * probs[:, 1]


class HaarBank(nn.Module):
    """Fixed ``levels``-level 2D Haar DWT: [B, 1, H, W] -> sub-bands [B, 4 * levels, H / 2**levels, W / 2**levels].

    Level 1's four bands are average-pooled to the coarsest grid; each further level splits the
    previous LL. The filters are orthonormal, so the bands of one level hold the image's energy.
    """

    def __init__(self, levels: int = 2) -> None:
        super().__init__()
        lo, hi = torch.tensor([1.0, 1.0]) / math.sqrt(2.0), torch.tensor([1.0, -1.0]) / math.sqrt(2.0)
        filters = torch.stack([torch.outer(a, b) for a, b in ((lo, lo), (hi, lo), (lo, hi), (hi, hi))])
        self.register_buffer("filters", filters.unsqueeze(1), persistent=False)  # [4, 1, 2, 2]; not a weight
        self.levels = levels

    def level(self, x: torch.Tensor) -> torch.Tensor:
        """One DWT level of a single-channel map: [B, 1, H, W] -> [B, 4, H/2, W/2] (LL, LH, HL, HH)."""
        return F.conv2d(x, self.filters, stride=2)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        bands, ll = [], image
        for _ in range(self.levels):
            sub = self.level(ll)
            bands.append(sub)
            ll = sub[:, :1]
        size = bands[-1].shape[-2:]
        return torch.cat([F.adaptive_avg_pool2d(b, size) if b.shape[-2:] != size else b for b in bands], dim=1)


class SubbandAttention(nn.Module):
    """Per-sample weights over the sub-bands from their log-energies (softmax, mean weight 1)."""

    def __init__(self, n_bands: int, hidden: int = 16) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(n_bands, hidden), nn.ReLU(inplace=False), nn.Linear(hidden, n_bands))

    def forward(self, bands: torch.Tensor) -> torch.Tensor:
        b, k = bands.shape[0], bands.shape[1]
        energy = torch.log(bands.reshape(b, k, math.prod(bands.shape[2:])).square().mean(dim=-1) + 1e-6)
        weights = torch.softmax(self.score(energy), dim=-1) * k
        return bands * weights.reshape(b, k, 1, 1)


class RegionAttention(nn.Module):
    """Attention pooling: a 1x1 conv scores every position, softmax over one image's positions."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.score = Convolution(2, channels, 1, kernel_size=1, conv_only=True)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        b, c, n = feat.shape[0], feat.shape[1], math.prod(feat.shape[2:])
        attn = torch.softmax(self.score(feat).reshape(b, 1, n), dim=-1)
        return (feat.reshape(b, c, n) * attn).sum(dim=-1)


class WaveletFusion(nn.Module):
    """CNN + wavelet-attention image model and clinical model, late probability fusion (model=wavelet_fusion)."""

    provides = frozenset({"z_image", "z_clinical", "proj", "proto_logits"})

    def __init__(self, spec: ModelSpec, levels: int = 2) -> None:
        super().__init__()
        if spec.spatial_dims != 2:
            raise ValueError(f"model 'wavelet_fusion' is for 2D radiographs; task.spatial_dims is {spec.spatial_dims}")
        m = spec.model
        self.image = ImageEncoder(2, m.width, m.stages, m.embed_dim, spec.n_classes, m.nonlocal_heads, spec.in_channels,
                                  enhance=False)
        self.wavelet = HaarBank(levels)
        n_bands = 4 * levels
        self.subbands = SubbandAttention(n_bands)
        # the sub-bands sit at 1/2**levels of the input; the backbone ends at 1/2**(stages+1)
        convs: list[nn.Module] = []
        ch = n_bands
        for _ in range(max(m.stages + 1 - levels, 0)):
            convs.append(Convolution(2, ch, m.width, strides=2, kernel_size=3, act=ACT, norm=group_norm(m.width)))
            ch = m.width
        convs.append(Convolution(2, ch, m.width, kernel_size=3, act=ACT, norm=group_norm(m.width)))
        self.wavelet_convs = nn.Sequential(*convs)
        self.regions = RegionAttention(self.image.channels + m.width)
        self.wavelet_embed = nn.Linear(m.width, m.embed_dim)
        self.clinical = ClinicalEncoder(spec.n_clinical, m.clinical_hidden, m.embed_dim, m.dropout)
        self.dropout = nn.Dropout(m.dropout)
        self.image_classifier = nn.Linear(m.embed_dim, spec.n_classes)
        self.clinical_classifier = nn.Linear(m.embed_dim, spec.n_classes)
        self.mix = ScaledProbabilityMix()
        self.aux = AuxHeads(spec, 2 * m.embed_dim)

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        """The image embedding: backbone map and wavelet stream stacked and pooled by one region
        attention; the backbone's part goes through the backbone's own projection, the wavelet's
        through its own, and the two are summed."""
        feat, _ = self.image.feature_map(image)
        wav = self.wavelet_convs(self.subbands(self.wavelet(image)))
        if wav.shape[-2:] != feat.shape[-2:]:  # odd input sizes round differently in the two streams
            wav = F.adaptive_avg_pool2d(wav, feat.shape[-2:])
        pooled = self.regions(torch.cat([feat, wav], dim=1))
        c = self.image.channels
        return self.image.embed(pooled[:, :c]) + self.wavelet_embed(pooled[:, c:])

    def forward(self, image: torch.Tensor, clinical: torch.Tensor) -> dict[str, torch.Tensor]:
        z_image = self.image_features(image)
        return late_fusion_outputs(self, z_image, self.clinical(clinical))
