"""What a model builder receives: the model config plus the sizes derived from the task."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from shared.config import ModelConfig
from shared.models.blocks import ProjectionHead, PrototypeHead, ViewAugment


@dataclass(frozen=True)
class ModelSpec:
    """Everything a builder needs; the server can fill it from the config before any data is seen.

    ``outputs`` lists the optional outputs the training loss reads (e.g. ``proj``); a model
    builds only the heads that are asked for, because a head that receives no gradient is an
    unused parameter, which Opacus refuses and FedAvg would aggregate for nothing.
    """

    model: ModelConfig
    spatial_dims: int
    n_classes: int
    n_clinical: int
    in_channels: int = 1
    mask_labels: tuple[str, ...] = ()  # task.mask_labels: the input then carries K+1 mask channels after the image
    outputs: frozenset[str] = field(default_factory=frozenset)


class AuxHeads(nn.Module):
    """The optional heads for the auxiliary loss, built from ``spec.outputs``.

    ``proj``: L2-normalised projection; ``proto_logits``: cosine similarity to class prototypes
    (needs the projection, so asking for it builds both).
    """

    def __init__(self, spec: ModelSpec, in_dim: int) -> None:
        super().__init__()
        wants_proto = "proto_logits" in spec.outputs
        self.proj = ProjectionHead(in_dim, spec.model.proj_dim) if wants_proto or "proj" in spec.outputs else None
        self.proto = PrototypeHead(spec.model.proj_dim, spec.n_classes, spec.model.temperature) if wants_proto else None

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.proj is not None:
            out["proj"] = self.proj(h)
            if self.proto is not None:
                out["proto_logits"] = self.proto(out["proj"])
        return out


class ViewHeads(nn.Module):
    """Two views of the same patient for the view contrast: the model's image embedding and the
    embedding of an in-model augmented copy (``ViewAugment``), projected by one shared head.

    The model calls ``augment`` and its own image encoder a second time; Opacus sums a module's
    per-sample gradients over repeated calls, so each patient still has one clipped gradient.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.augment = ViewAugment()
        self.proj = ProjectionHead(spec.model.embed_dim, spec.model.proj_dim)

    def forward(self, z_image: torch.Tensor, z_view: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.proj(z_image), self.proj(z_view)], dim=1)  # [B, 2, P]
