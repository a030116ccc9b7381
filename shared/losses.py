"""Training losses: cross-entropy on the logits plus an optional auxiliary contrastive term.

Each auxiliary loss declares ``couples_batch``: whether one patient's loss (and so its
gradient) depends on the other patients in the batch. DP-SGD bounds a patient's influence
by clipping that patient's own gradient, which only means something when the loss is a sum
of per-patient terms; batch-coupled losses (in-batch SupCon, InfoNCE) are therefore refused
when privacy is on, and the per-sample ones (class prototypes, the patient's own
image<->clinical pair against a fixed bank that holds no patient data) take their place.
Each loss also declares ``needs``: the model outputs it reads, so the model builds exactly
the heads that get a gradient.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from shared.config import ConfigError, FedmskConfig, register_check

BRANCH_WEIGHT = 0.5  # weight of the mean CE over deeply supervised branch logits (logits_<branch>)
BANK_SIZE = 256  # negatives in the fixed non-private bank
BANK_SEED = 20240611  # fixed: every site and every round uses the same public bank


class AuxLoss(nn.Module):
    """An auxiliary loss: ``forward(outputs, labels) -> scalar`` (mean over the batch)."""

    couples_batch: ClassVar[bool] = False
    needs: ClassVar[frozenset[str]] = frozenset()

    def forward(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class NoAux(AuxLoss):
    """No auxiliary term."""

    def forward(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return outputs["logits"].new_zeros(())


class SupCon(AuxLoss):
    """Supervised contrastive loss (Khosla et al. 2020) with in-batch positives and negatives.

    Every other patient of the same class in the batch is a positive, every patient of another
    class a negative: each patient's loss depends on the whole batch (batch-coupled).
    """

    couples_batch = True
    needs = frozenset({"proj"})

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        z = outputs["proj"]
        n = z.shape[0]
        self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
        sim = (z @ z.t() / self.temperature).masked_fill(self_mask, float("-inf"))
        log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
        pos = (labels[:, None] == labels[None, :]) & ~self_mask
        n_pos = pos.sum(dim=1)
        has_pos = n_pos > 0
        if not bool(has_pos.any()):
            return z.sum() * 0.0  # no anchor has a positive: nothing to contrast, keep the graph
        per_anchor = -(log_prob.masked_fill(~pos, 0.0).sum(dim=1)[has_pos] / n_pos[has_pos])
        return per_anchor.mean()


class InfoNCE(AuxLoss):
    """Image<->clinical InfoNCE (CLIP-style): a patient's own pair against the other patients.

    The negatives are the other patients in the batch, so the loss is batch-coupled.
    """

    couples_batch = True
    needs = frozenset({"z_image", "z_clinical"})

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        zi = F.normalize(outputs["z_image"], dim=-1)
        zc = F.normalize(outputs["z_clinical"], dim=-1)
        logits = zi @ zc.t() / self.temperature
        target = torch.arange(zi.shape[0], device=zi.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


class Prototype(AuxLoss):
    """Supervised contrast of each patient's projection against learnable class prototypes.

    The prototypes are part of the model (``PrototypeHead``) so DP-SGD clips and noises their
    gradients and FedAvg shares them; the loss is a per-sample cross-entropy over the cosine
    similarities: the patient's own class prototype is the positive, the others negatives.
    """

    needs = frozenset({"proj", "proto_logits"})

    def forward(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs["proto_logits"], labels)


class _BankContrast(AuxLoss):
    """Two embeddings of one patient as each other's positive, against a fixed public bank.

    The negatives are ``BANK_SIZE`` random unit vectors from a fixed public seed (no patient
    data, identical at every site), so each patient's term depends on that patient only.
    """

    def __init__(self, temperature: float, dim: int) -> None:
        super().__init__()
        self.temperature = temperature
        gen = torch.Generator().manual_seed(BANK_SEED)
        self.register_buffer("bank", F.normalize(torch.randn(BANK_SIZE, dim, generator=gen), dim=-1))

    def contrast(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        bank: torch.Tensor = self.bank  # type: ignore[assignment]
        pos = (a * b).sum(dim=-1, keepdim=True)
        target = torch.zeros(a.shape[0], dtype=torch.long, device=a.device)
        terms = [F.cross_entropy(torch.cat([pos, z @ bank.t()], dim=1) / self.temperature, target) for z in (a, b)]
        return 0.5 * (terms[0] + terms[1])


class InfoNCEBank(_BankContrast):
    """Image<->clinical contrast of the patient's own pair against the fixed, non-private bank:
    per-sample, DP-safe."""

    needs = frozenset({"z_image", "z_clinical"})

    def forward(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return self.contrast(F.normalize(outputs["z_image"], dim=-1), F.normalize(outputs["z_clinical"], dim=-1))


class ViewContrast(_BankContrast):
    """Two views of the same patient (the model's image and an in-model augmented copy) pulled
    together against the fixed non-private bank: the positive is the patient's own other view,
    the negatives hold no patient data, so the term is per-sample (DP-safe).
    """

    needs = frozenset({"proj_views"})

    def forward(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        views = outputs["proj_views"]  # [B, 2, P], L2-normalised
        return self.contrast(views[:, 0], views[:, 1])


class Segmentation(AuxLoss):
    """Cross-entropy + Dice (MONAI) of every segmentation decoder against the site's mask, per patient.

    The mask rides in the input's extra channels (shared.masks) and the model hands it back as
    ``seg_target`` (one-hot, soft after augmentation, all zero where no one annotated). A pixel
    counts where its one-hot sums to > 0.5, and a patient without any annotated pixel contributes
    exactly zero, so sites without masks train the classifier alone. Each patient's term depends
    on that patient only (per-sample, DP-safe); the batch mean keeps Opacus' mean reduction.
    """

    needs = frozenset({"seg_logits", "seg_target"})

    def __init__(self) -> None:
        super().__init__()
        from monai.losses import DiceLoss

        self.dice = DiceLoss(include_background=False, reduction="none")  # batch=False: one Dice per patient and class

    def forward(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        logits, target = outputs["seg_logits"], outputs["seg_target"]  # [B, D, C, *sp], [B, C, *sp]
        weight = (target.sum(dim=1) > 0.5).float()  # [B, *sp]: annotated pixels
        n_pixels = weight.flatten(1).sum(dim=1)
        hard = target.argmax(dim=1)
        onehot = F.one_hot(hard, target.shape[1]).movedim(-1, 1).float() * weight[:, None]
        terms = []
        for d in range(logits.shape[1]):
            ce = (F.cross_entropy(logits[:, d], hard, reduction="none") * weight).flatten(1).sum(dim=1) / n_pixels.clamp_min(1.0)
            prob = torch.softmax(logits[:, d], dim=1) * weight[:, None]
            terms.append(ce + self.dice(prob, onehot).flatten(1).mean(dim=1))
        return (torch.stack(terms).mean(dim=0) * (n_pixels > 0).float()).mean()


AUX_LOSSES: dict[str, type[AuxLoss]] = {
    "none": NoAux,
    "supcon": SupCon,
    "infonce": InfoNCE,
    "prototype": Prototype,
    "infonce_bank": InfoNCEBank,
    "views": ViewContrast,
    "segmentation": Segmentation,
}
DP_SAFE_AUX = sorted(k for k, v in AUX_LOSSES.items() if not v.couples_batch)


def empty_batch_loss(outputs: dict[str, torch.Tensor | None], *, per_sample: bool = False) -> torch.Tensor:
    """The zero loss of an empty Poisson batch (B=0), wired to every output of the model.

    Opacus' DP optimizer wants a per-sample gradient (here of batch size 0) on every trainable
    parameter before its noisy step; a parameter the zero loss does not reach (the branch
    heads, the projection and prototypes of an auxiliary loss) has none and the step raises
    "Per sample gradient is not initialized". ``per_sample``: one zero per patient, shape [0],
    for ghost clipping's ``reduction="none"``.
    """
    terms = [v.flatten(1).sum(1) if v.dim() > 1 else v for v in outputs.values()
             if torch.is_tensor(v) and v.is_floating_point()]
    zero = torch.stack(terms).sum(0) * 0.0
    return zero if per_sample else zero.sum()


class Criterion(nn.Module):
    """CE(logits) + BRANCH_WEIGHT * mean CE(logits_<branch>) + aux_weight * aux.

    ``forward(outputs, labels) -> (loss, parts)`` with ``parts`` the float value of each term,
    for logging. Every term is a batch mean, as Opacus expects with ``loss_reduction="mean"``.
    """

    def __init__(self, aux: AuxLoss, aux_weight: float) -> None:
        super().__init__()
        self.aux = aux
        self.aux_weight = aux_weight

    @property
    def couples_batch(self) -> bool:
        """Whether a patient's loss depends on the other patients in the batch."""
        return self.aux_weight > 0 and self.aux.couples_batch

    def forward(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if labels.numel() == 0:  # an empty Poisson batch under DP-SGD: no patient, no loss (the noisy step still runs)
            return empty_batch_loss(outputs), {"loss": 0.0}
        ce = F.cross_entropy(outputs["logits"], labels)
        loss = ce
        parts = {"ce": float(ce.detach())}
        branches = [v for k, v in outputs.items() if k.startswith("logits_") and v is not None]
        if branches:
            branch = torch.stack([F.cross_entropy(b, labels) for b in branches]).mean()
            loss = loss + BRANCH_WEIGHT * branch
            parts["branch"] = float(branch.detach())
        if self.aux_weight > 0 and not isinstance(self.aux, NoAux):
            aux = self.aux(outputs, labels)
            loss = loss + self.aux_weight * aux
            parts["aux"] = float(aux.detach())
        parts["loss"] = float(loss.detach())
        return loss, parts


@register_check  # at compose time too: a batch-coupled aux loss under DP is refused before anything starts
def check_dp_safe(cfg: FedmskConfig) -> None:
    """Refuse a batch-coupled auxiliary loss when DP is on (the guarantee would silently fail)."""
    name = cfg.model.aux_loss
    if name not in AUX_LOSSES:
        raise ConfigError(f"config 'model.aux_loss' is '{name}'; available: {', '.join(sorted(AUX_LOSSES))}")
    if cfg.privacy.enabled and cfg.model.aux_weight > 0 and AUX_LOSSES[name].couples_batch:
        raise ConfigError(
            f"config 'model.aux_loss={name}' with 'privacy.enabled=true' is refused: {name} contrasts each "
            f"patient against the other patients in the batch, so one patient's gradient depends on the others "
            f"and DP-SGD's per-patient clipping no longer bounds that patient's influence (the privacy guarantee "
            f"would silently not hold). Use a per-sample loss: model.aux_loss=prototype (supervised contrast "
            f"against class prototypes), model.aux_loss=infonce_bank (image<->clinical against a fixed "
            f"non-private bank), model.aux_loss=views (two views of the same patient against that bank), "
            f"or model.aux_weight=0."
        )


def build_criterion(cfg: FedmskConfig) -> Criterion:
    """The training criterion for ``cfg.model``; refuses batch-coupled aux losses under DP."""
    name = cfg.model.aux_loss
    if name not in AUX_LOSSES:
        raise ConfigError(f"config 'model.aux_loss' is '{name}'; available: {', '.join(sorted(AUX_LOSSES))}")
    check_dp_safe(cfg)
    m = cfg.model
    cls = AUX_LOSSES[name]
    aux: AuxLoss
    if cls is InfoNCEBank:
        aux = InfoNCEBank(m.temperature, m.embed_dim)
    elif cls is ViewContrast:
        aux = ViewContrast(m.temperature, m.proj_dim)
    elif cls in (SupCon, InfoNCE):
        aux = cls(m.temperature)  # type: ignore[call-arg]
    else:
        aux = cls()
    return Criterion(aux, m.aux_weight)
