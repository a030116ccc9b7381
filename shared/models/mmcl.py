"""MM-CL (multimodal contrastive learning for sarcopenia screening) and its image-only ablation.

MM-CL: the image branch (CNN + CAM enhancement + non-local block) and the clinical MLP each
give an embedding; a gate computed from both decides, per feature and per patient, how much
to trust the image versus the clinical data; the fused embedding feeds the classifier and
the projection head used by the auxiliary contrastive loss.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.models.blocks import ClinicalEncoder, ImageEncoder
from shared.models.spec import AuxHeads, ModelSpec, ViewHeads


def _image_encoder(spec: ModelSpec) -> ImageEncoder:
    m = spec.model
    return ImageEncoder(
        spec.spatial_dims, m.width, m.stages, m.embed_dim, spec.n_classes, m.nonlocal_heads, spec.in_channels
    )


class MMCL(nn.Module):
    """Visual-clinical fusion model; outputs logits, CAM logits, both embeddings and aux heads."""

    provides = frozenset({"z_image", "z_clinical", "proj", "proto_logits", "proj_views"})

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        m = spec.model
        self.image = _image_encoder(spec)
        self.clinical = ClinicalEncoder(spec.n_clinical, m.clinical_hidden, m.embed_dim, m.dropout)
        self.gate = nn.Linear(2 * m.embed_dim, m.embed_dim)
        self.dropout = nn.Dropout(m.dropout)
        self.classifier = nn.Linear(m.embed_dim, spec.n_classes)
        self.aux = AuxHeads(spec, m.embed_dim)
        self.views = ViewHeads(spec) if "proj_views" in spec.outputs else None

    def forward(self, image: torch.Tensor, clinical: torch.Tensor) -> dict[str, torch.Tensor]:
        z_image, cam_logits = self.image(image)
        z_clinical = self.clinical(clinical)
        g = torch.sigmoid(self.gate(torch.cat([z_image, z_clinical], dim=-1)))
        fused = g * z_image + (1.0 - g) * z_clinical
        out = {
            "logits": self.classifier(self.dropout(fused)),
            "logits_cam": cam_logits,
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
