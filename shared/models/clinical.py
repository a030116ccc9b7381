"""Clinical-only models: a small MLP, and the logistic-regression reference a clinician would fit."""

from __future__ import annotations

import torch
from torch import nn

from shared.models.blocks import ClinicalEncoder
from shared.models.spec import AuxHeads, ModelSpec


class ClinicalOnly(nn.Module):
    """MLP on the clinical vector alone (the image is ignored)."""

    provides = frozenset({"z_clinical", "proj", "proto_logits"})

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        m = spec.model
        self.clinical = ClinicalEncoder(spec.n_clinical, m.clinical_hidden, m.embed_dim, m.dropout)
        self.dropout = nn.Dropout(m.dropout)
        self.classifier = nn.Linear(m.embed_dim, spec.n_classes)
        self.aux = AuxHeads(spec, m.embed_dim)

    def forward(self, image: torch.Tensor, clinical: torch.Tensor) -> dict[str, torch.Tensor]:
        z_clinical = self.clinical(clinical)
        out = {"logits": self.classifier(self.dropout(z_clinical)), "z_clinical": z_clinical}
        out.update(self.aux(z_clinical))
        return out


class LogReg(nn.Module):
    """One linear layer on the standardised clinical vector: multinomial logistic regression."""

    provides: frozenset[str] = frozenset()

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.linear = nn.Linear(spec.n_clinical, spec.n_classes)
        # Start from the all-equal prediction, as a fitted-from-scratch logistic regression
        # does: a random start can rank patients backwards for the first hundred steps.
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, image: torch.Tensor, clinical: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.linear(clinical)}
