"""Segmentation-for-classification (hand radiograph osteoporosis; seed: Hwang, Lee, Yoon 2025).

A small MONAI U-Net segments the radius, ulna and metacarpals; two decoders on its features give
two hypotheses of the mask (the seed paper mixes several probabilistic decoders), whose mean is
the mask probability and whose disagreement (total variation between the two class
distributions, per pixel) is its uncertainty. Image, mask probabilities and uncertainty are
stacked as the classifier's input channels, so the classifier is told where the bones are (the
second metacarpal's cortex carries the osteoporosis signal) and where the segmentation is
unsure. The segmentation output is detached before the classifier: the U-Net is trained by the
masks alone (``model.aux_loss=segmentation``), as in the seed's two-stage design, and stays a
segmentation a reader can look at; sites without masks train the classifier only.

The mask is never a model input: it rides in the input's extra channels (shared.masks) only to
reach the loss, and the layers see channel 0 alone, so inference takes a plain one-channel
radiograph. Every norm is GroupNorm/LayerNorm and nothing mixes samples, so Opacus computes
per-sample gradients of the whole model (segmentation included) without surgery.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import UNet
from torch import nn

from shared.config import ConfigError
from shared.models.blocks import ACT, ImageEncoder, group_norm
from shared.models.spec import ModelSpec

DECODERS = 2
DEFAULT_LABELS = ("radius", "ulna", "metacarpals")  # a task without masks still gets a segmentation head


class SegClass(nn.Module):
    """U-Net segmentation (two decoders) -> [image, mask probabilities, uncertainty] -> CNN classifier."""

    provides = frozenset({"z_image", "seg_logits", "seg_target"})
    reads_masks = True

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        if not {"seg_logits", "seg_target"} <= spec.outputs:
            raise ConfigError("model 'segclass' trains its segmentation with model.aux_loss=segmentation and "
                              "model.aux_weight > 0 (configs/model/segclass.yaml)")
        m = spec.model
        dims = spec.spatial_dims
        self.n_seg = len(spec.mask_labels or DEFAULT_LABELS) + 1  # with background
        w = max(4, m.width // 2)
        self.seg = UNet(dims, in_channels=1, out_channels=w, channels=(w, 2 * w, 4 * w), strides=(2, 2),
                        num_res_units=1, act=ACT, norm=group_norm(w), dropout=m.dropout)
        self.decoders = nn.ModuleList(
            nn.Sequential(Convolution(dims, w, w, kernel_size=3, act=ACT, norm=group_norm(w), dropout=m.dropout),
                          Convolution(dims, w, self.n_seg, kernel_size=1, conv_only=True))
            for _ in range(DECODERS)
        )
        # the classifier sees the image, the K foreground probabilities and the uncertainty map
        self.image = ImageEncoder(dims, m.width, m.stages, m.embed_dim, spec.n_classes, m.nonlocal_heads,
                                  in_channels=1 + (self.n_seg - 1) + 1)
        self.dropout = nn.Dropout(m.dropout)
        self.classifier = nn.Linear(m.embed_dim, spec.n_classes)

    def segment(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B,1,*sp] -> decoder logits [B,D,C,*sp], mean probabilities [B,C,*sp], uncertainty [B,1,*sp]."""
        feat = self.seg(image)
        logits = torch.stack([dec(feat) for dec in self.decoders], dim=1)
        probs = torch.softmax(logits, dim=2)
        uncertainty = 0.5 * (probs[:, 0] - probs[:, 1]).abs().sum(dim=1, keepdim=True)
        return logits, probs.mean(dim=1), uncertainty

    def forward(self, image: torch.Tensor, clinical: torch.Tensor) -> dict[str, torch.Tensor]:
        x = image[:, :1]
        target = image[:, 1:] if image.shape[1] > 1 else x.new_zeros(x.shape[0], self.n_seg, *x.shape[2:])
        if target.shape[1] != self.n_seg:
            raise ValueError(f"segclass expects 1 image + {self.n_seg} mask channels (task.mask_labels), got {image.shape[1]}")
        seg_logits, probs, uncertainty = self.segment(x)
        guide = torch.cat([probs[:, 1:], uncertainty], dim=1).detach()  # the U-Net learns from masks only
        z_image, cam_logits = self.image(torch.cat([x, guide], dim=1))
        return {
            "logits": self.classifier(self.dropout(z_image)),
            "logits_cam": cam_logits,
            "z_image": z_image,
            "seg_logits": seg_logits,
            "seg_target": target,
        }
