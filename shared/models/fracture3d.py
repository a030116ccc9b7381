"""Fracture3D: vertebral fracture grading from a CT volume, with a supervised-contrastive
auxiliary task ("Faint Features Tell", Wei et al. 2022, arXiv 2208.10698).

The paper's architecture is not public (shared SEEDS.md b); what it states is the pattern:
a classifier of Genant grades trained together with a supervised contrastive loss on the
image features, so that faint (mild) fractures are pulled towards their grade's cluster
instead of drowning in the normal class. Here: fedmsk's MONAI-block image encoder in 3D
(strided residual units, GroupNorm: DP-ready), the optional clinical columns (age, sex)
joined late, a grade classifier, and the projection head the auxiliary loss reads, on the
image embedding alone (the contrast is about what the CT shows). Under DP the config's
per-sample contrast (prototype / views) replaces in-batch SupCon (shared.losses).

No CAM enhancement or non-local block: at a 32^3 input the last feature map is 2^3 voxels, too
few positions for spatial attention to select from.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.models.blocks import ClinicalEncoder, ImageEncoder
from shared.models.spec import AuxHeads, ModelSpec, ViewHeads


class Fracture3D(nn.Module):
    """3D CNN + optional clinical MLP -> grade logits; image embedding -> contrastive projection."""

    provides = frozenset({"z_image", "z_clinical", "proj", "proto_logits", "proj_views"})

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        m = spec.model
        # spatial_dims from the task (3 for CT); the registry's shared tests also run it in 2D
        self.image = ImageEncoder(spec.spatial_dims, m.width, m.stages, m.embed_dim, spec.n_classes, m.nonlocal_heads, spec.in_channels,
                                  enhance=False)
        self.clinical = ClinicalEncoder(spec.n_clinical, m.clinical_hidden, m.embed_dim, m.dropout) if spec.n_clinical else None
        joined = m.embed_dim * (2 if self.clinical is not None else 1)
        self.fuse = nn.Sequential(nn.Linear(joined, m.embed_dim), nn.LayerNorm(m.embed_dim), nn.ReLU(inplace=False))
        self.dropout = nn.Dropout(m.dropout)
        self.classifier = nn.Linear(m.embed_dim, spec.n_classes)
        self.aux = AuxHeads(spec, m.embed_dim)
        self.views = ViewHeads(spec) if "proj_views" in spec.outputs else None

    def forward(self, image: torch.Tensor, clinical: torch.Tensor) -> dict[str, torch.Tensor]:
        z_image, _ = self.image(image)
        out: dict[str, torch.Tensor] = {"z_image": z_image}
        joined = z_image
        if self.clinical is not None:
            out["z_clinical"] = self.clinical(clinical)
            joined = torch.cat([z_image, out["z_clinical"]], dim=-1)
        out["logits"] = self.classifier(self.dropout(self.fuse(joined)))
        out.update(self.aux(z_image))
        if self.views is not None:
            out["proj_views"] = self.views(z_image, self.image(self.views.augment(image))[0])
        return out
