"""MM-CL (multimodal contrastive learning for sarcopenia screening) and its image-only ablation.

MM-CL follows Jin et al. (MICCAI 2023): the image branch (CNN + CAM enhancement + non-local
block) gives a feature map; the clinical MLP gives an embedding that is broadcast over the
map's positions and stacked with it; self-attention over the stacked map (Visual-text Feature
Fusion, ``VisualClinicalFusion``) models the correlations between image regions and the
clinical profile, and its pooled output feeds the classifier and the projection head of the
auxiliary contrastive loss. Two additions, each measured (README "Expected results"):

- the image branch is deeply supervised through its own linear head (``logits_image``): on a
  few hundred patients the clinical columns are learned in a few epochs, and without it the
  fused classifier stops asking the slower image branch for the image-only signal;
- a linear read-out of the standardised clinical vector is added to the logits (zero at
  init): the fused model contains a logistic regression on the clinical columns, so the
  attention branch only has to learn what the table cannot say.

``model.fusion=gate`` keeps fedmsk's earlier per-feature sigmoid gate between the two
embeddings as an ablation.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.models.blocks import ClinicalEncoder, ImageEncoder, VisualClinicalFusion
from shared.models.spec import AuxHeads, ModelSpec, ViewHeads

FUSIONS = ("attention", "gate")


def _image_encoder(spec: ModelSpec) -> ImageEncoder:
    m = spec.model
    return ImageEncoder(
        spec.spatial_dims, m.width, m.stages, m.embed_dim, spec.n_classes, m.nonlocal_heads, spec.in_channels
    )


class MMCL(nn.Module):
    """Visual-clinical fusion model; outputs logits, branch logits, both embeddings and aux heads."""

    provides = frozenset({"z_image", "z_clinical", "proj", "proto_logits", "proj_views"})

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        m = spec.model
        if m.fusion not in FUSIONS:
            raise ValueError(f"config 'model.fusion' is '{m.fusion}'; use one of {FUSIONS}")
        self.image = _image_encoder(spec)
        self.clinical = ClinicalEncoder(spec.n_clinical, m.clinical_hidden, m.embed_dim, m.dropout)
        if m.fusion == "attention":
            self.fusion: nn.Module = VisualClinicalFusion(spec.spatial_dims, self.image.channels, m.embed_dim)
            fused_dim = self.fusion.out_dim
        else:
            self.fusion = nn.Linear(2 * m.embed_dim, m.embed_dim)
            fused_dim = m.embed_dim
        self.dropout = nn.Dropout(m.dropout)
        self.classifier = nn.Sequential(
            nn.Linear(fused_dim, m.embed_dim), nn.ReLU(inplace=False), nn.Linear(m.embed_dim, spec.n_classes)
        )
        self.image_head = nn.Linear(m.embed_dim, spec.n_classes)
        self.clinical_linear = nn.Linear(spec.n_clinical, spec.n_classes)
        nn.init.zeros_(self.clinical_linear.weight)
        nn.init.zeros_(self.clinical_linear.bias)
        self.aux = AuxHeads(spec, fused_dim)
        self.views = ViewHeads(spec) if "proj_views" in spec.outputs else None

    def forward(self, image: torch.Tensor, clinical: torch.Tensor) -> dict[str, torch.Tensor]:
        feat, cam_logits = self.image.feature_map(image)
        z_image = self.image.embed_map(feat)
        z_clinical = self.clinical(clinical)
        if isinstance(self.fusion, VisualClinicalFusion):
            fused = self.fusion(feat, z_clinical)
        else:
            g = torch.sigmoid(self.fusion(torch.cat([z_image, z_clinical], dim=-1)))
            fused = g * z_image + (1.0 - g) * z_clinical
        out = {
            "logits": self.classifier(self.dropout(fused)) + self.clinical_linear(clinical),
            "logits_cam": cam_logits,
            "logits_image": self.image_head(self.dropout(z_image)),
            "z_image": z_image,
            "z_clinical": z_clinical,
        }
        out.update(self.aux(fused))
        if self.views is not None:
            out["proj_views"] = self.views(z_image, self.image(self.views.augment(image))[0])
        return out


class ImageOnly(nn.Module):
    """The MM-CL image branch alone: what the radiograph can tell without clinical data."""

    provides = frozenset({"z_image", "proj", "proto_logits", "proj_views"})

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.image = _image_encoder(spec)
        self.dropout = nn.Dropout(spec.model.dropout)
        self.classifier = nn.Linear(spec.model.embed_dim, spec.n_classes)
        self.aux = AuxHeads(spec, spec.model.embed_dim)
        self.views = ViewHeads(spec) if "proj_views" in spec.outputs else None

    def forward(self, image: torch.Tensor, clinical: torch.Tensor) -> dict[str, torch.Tensor]:
        z_image, cam_logits = self.image(image)
        out = {"logits": self.classifier(self.dropout(z_image)), "logits_cam": cam_logits, "z_image": z_image}
        out.update(self.aux(z_image))
        if self.views is not None:
            out["proj_views"] = self.views(z_image, self.image(self.views.augment(image))[0])
        return out
