"""Late probability fusion: an image CNN and a clinical MLP predict separately, a learned weight mixes them.

The reference design a radiologist-plus-clinician workflow resembles: two opinions, combined
at the end. Logits are the log of the mixed probabilities (so cross-entropy on them is the
NLL of the fused prediction); the branch logits are exposed so the loss supervises each
branch on its own too (otherwise the weaker branch gets little signal once the mix leans
on the stronger one).
"""

from __future__ import annotations

import torch
from torch import nn

from shared.models.blocks import ClinicalEncoder, ImageEncoder
from shared.models.spec import AuxHeads, ModelSpec


class ProbabilityMix(nn.Module):
    """Mix stacked branch probabilities [B, 2, C] with a learned weight w = sigmoid(alpha).

    One tensor in, one out: Opacus computes the per-sample gradient of ``alpha`` via functorch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(1))

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.alpha)
        return w * probs[:, 0] + (1.0 - w) * probs[:, 1]


class LateFusion(nn.Module):
    """Image CNN + clinical MLP, each with its own classifier; probabilities fused by ProbabilityMix."""

    provides = frozenset({"z_image", "z_clinical", "proj", "proto_logits"})

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        m = spec.model
        self.image = ImageEncoder(
            spec.spatial_dims, m.width, m.stages, m.embed_dim, spec.n_classes, m.nonlocal_heads, spec.in_channels,
            enhance=False,
        )
        self.clinical = ClinicalEncoder(spec.n_clinical, m.clinical_hidden, m.embed_dim, m.dropout)
        self.dropout = nn.Dropout(m.dropout)
        self.image_classifier = nn.Linear(m.embed_dim, spec.n_classes)
        self.clinical_classifier = nn.Linear(m.embed_dim, spec.n_classes)
        self.mix = ProbabilityMix()
        self.aux = AuxHeads(spec, 2 * m.embed_dim)

    def forward(self, image: torch.Tensor, clinical: torch.Tensor) -> dict[str, torch.Tensor]:
        z_image, _ = self.image(image)
        return late_fusion_outputs(self, z_image, self.clinical(clinical))


def late_fusion_outputs(model: nn.Module, z_image: torch.Tensor, z_clinical: torch.Tensor) -> dict[str, torch.Tensor]:
    """Branch classifiers, the learned probability mix and the aux heads on the two embeddings: the
    head every late-fusion model shares (``model`` holds dropout, image/clinical_classifier, mix, aux)."""
    logits_image = model.image_classifier(model.dropout(z_image))
    logits_clinical = model.clinical_classifier(model.dropout(z_clinical))
    probs = torch.stack([logits_image.softmax(dim=-1), logits_clinical.softmax(dim=-1)], dim=1)
    out = {
        "logits": torch.log(model.mix(probs).clamp_min(1e-8)),
        "logits_image": logits_image,
        "logits_clinical": logits_clinical,
        "z_image": z_image,
        "z_clinical": z_clinical,
    }
    out.update(model.aux(torch.cat([z_image, z_clinical], dim=-1)))
    return out
