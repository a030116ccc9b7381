"""Pretraining objectives for `fedmsk pretrain`: encoders learnt from a hospital's images and
clinical records without labels, federated like any other training job.

A pretraining job is a model and a loss like the supervised one (``client.trainer.Screener``):
``PretrainNet`` holds the task model's own ``image`` (and ``clinical``) encoder plus the heads
the objective needs, and ``PretrainLoss`` returns ``(loss, parts)`` as ``Criterion`` does. So
the site's training loop, Opacus' DP-SGD, FedAvg, checkpoints and the ledger run it unchanged,
and in deployment the same ClientApp/ServerApp run it when the run config sets
``pretrain.objective``. Only the encoders are kept (``shared.provenance.write_pretrained``); any
task model whose encoders have the same shapes loads them through ``model.pretrained_path``.

Why the DP-safe objectives are per-sample. DP-SGD clips each patient's gradient and adds noise
scaled to that clip: the guarantee holds only if a patient's gradient is a function of that
patient alone. A loss whose negatives are the other patients of the batch (SimCLR, CLIP), or a
layer with batch statistics (BatchNorm), makes patient i's gradient move when patient j changes,
so clipping i bounds nothing about j. The objectives below avoid both:

- ``ssl`` / ``simsiam`` (Chen & He 2021): two augmented views of one image, a predictor and a
  stop-gradient; the loss of patient i is the negative cosine between i's own two views, with
  no negatives at all. Collapse is meant to be avoided by the predictor + stop-gradient
  asymmetry, not by batch statistics: the encoders use GroupNorm/LayerNorm and the heads
  LayerNorm (per sample), as in BYOL's "works without batch statistics" variant (Richemond et al.
  2020). Measured here it is not (below), hence the default's public variance term.
- ``ssl`` / ``bank``: the two views as each other's positive against ``BANK_SIZE`` fixed random
  unit vectors (no patient data, the same at every site): an InfoNCE whose negatives are public
  but not images, so a point far from every vector beats them (collapses, as SimSiam did).
- ``ssl`` / ``public`` (MoCo-style, He et al. 2020, with a public queue): the two views are each
  other's positive in an InfoNCE whose negatives are the current encoder's embeddings of
  ``pretrain.bank_size`` *public* images (``client.pretrain.public_bank``: a folder of public
  sites, or the task's own synthetic generator at a public seed, each image one augmented view),
  computed without gradient at every forward pass and centred on the bank's own mean (public
  statistics in place of a batch's). Why per-sample: patient i's loss reads i's two views, the
  weights and the public images, nothing else; the bank's embeddings and their mean are functions
  of the weights (the same for every patient of a step) and of public data, and being detached
  they open no path from one patient's gradient to another's (tested: replacing one patient of a
  batch leaves the others' per-sample gradients unchanged). A collapsed encoder scores log(K + 1),
  chance level, so collapse is no optimum of this loss as it is of SimSiam's. Measured, it did
  not help: its loss barely fell, and its encoders' embeddings still spanned 2-4 effective
  directions (SimSiam's ~2, random init 11), because with detached negatives the encoder can
  push a patient's views away from the public images but never the public images apart (that
  gradient would mix the bank into every patient's clipped gradient; ``public_variance`` does it
  outside the clipping instead). Kept as an option, not the default.
- ``crossmodal`` / ``bank``: the patient's image and clinical embeddings as positives, against
  that bank.
- ``crossmodal`` / ``batch``: CLIP's in-batch InfoNCE. Stronger negatives, but batch-coupled
  (``couples_batch``): refused under DP (``check_pretrain_dp``), allowed without.

Collapse, and why a reconstruction term. Without negatives drawn from the data, a per-sample
objective has a trivial optimum: every patient's embedding at one point (both views agree, and
a point far from every fixed bank vector beats the bank). Measured on 3 synthetic hospitals
(5 rounds, no DP), SimSiam and the bank cross-modal contrast both shrank the spread of the image
embeddings from 0.14 (random init) to under 0.01 (README "Federated pretraining"). So each objective
adds ``pretrain.recon_weight`` x a per-sample reconstruction: a linear decoder maps each encoder's
embedding back to its own input, coarsely (the image average-pooled to ``RECON_GRID`` per axis; the
clinical vector), which a collapsed embedding cannot do. It reads only that patient's input, so the
objective stays per-sample. It keeps the embeddings informative (a linear probe of SimSiam's beats
random features) but not spread: they span ~2 effective directions (11 at random init).

Hence ``pretrain.public_variance`` (``configs/pretrain/ssl.yaml``: 0.3 without DP, 1.0 under DP, each chosen on
tuning federations by bench/bench_pretrain_tune.py): VICReg's variance and
covariance terms (Bardes et al. 2022), which SimCLR-free methods use to stop dimensional collapse,
computed on the encoder's embeddings of the *public* image bank instead of the batch
(``vicreg_variance``, ``PretrainNet.public_variance_loss``). Why it is DP-safe: the term reads the
weights and public images only, so its gradient is not any patient's; ``client.pretrain.PublicVariance``
adds it to the update after DP-SGD has clipped and noised the patients' per-sample gradients, which
it never enters (tested), at no privacy cost (post-processing of the released weights). Measured
(bench/bench_pretrain_probe.py, same federation, side by side): effective rank 2.9 against SimSiam's
1.8 and spread 0.12 against 0.07, linear probe 0.77 against 0.80 (one run each); README "Federated
pretraining" has the figures and the fine-tuning table.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shared.config import ConfigError, FedmskConfig, register_check
from shared.losses import _BankContrast, empty_batch_loss

RECON_GRID = 8  # the reconstruction target: the input average-pooled to 8 per spatial axis (8x8, 8x8x8)
IMAGE_CHANNELS = 1  # grey-scale radiographs and CT: the image is channel 0, any mask channels follow (shared.masks)
ENCODER_NAMES = ("image", "clinical")  # the task models' encoder submodules (what a pretraining run keeps)


def objective_label(cfg: FedmskConfig) -> str:
    """What the job trains, for the ledger and the card: ``supervised`` or e.g. ``pretrain:ssl/simsiam``."""
    p = cfg.pretrain
    if p.objective == "none":
        return "supervised"
    return f"pretrain:{p.objective}/{p.ssl_loss if p.objective == 'ssl' else p.negatives}"


def uses_image_bank(cfg: FedmskConfig) -> bool:
    """Whether the job embeds public images: as negatives (``ssl_loss=public``) or for ``public_variance``."""
    p = cfg.pretrain
    return p.objective != "none" and ((p.objective == "ssl" and p.ssl_loss == "public") or p.public_variance > 0)


def vicreg_variance(z: torch.Tensor, cov_weight: float = 1.0) -> torch.Tensor:
    """VICReg's variance and covariance terms (Bardes, Ponce, LeCun 2022) over the rows of ``z`` [K, D]: a hinge
    keeping every dimension's SD at >= 1 plus the squared off-diagonal covariances / D. Applied to the public
    bank's embeddings only, it reads no patient."""
    z = z - z.mean(dim=0)
    std = torch.sqrt(z.var(dim=0) + 1e-4)
    cov = (z.t() @ z) / max(z.shape[0] - 1, 1)
    off = cov - torch.diag(torch.diag(cov))
    return F.relu(1.0 - std).mean() + cov_weight * off.pow(2).sum() / z.shape[1]


def couples_batch(cfg: FedmskConfig) -> bool:
    """Whether the pretraining loss makes one patient's gradient depend on the other patients."""
    return cfg.pretrain.objective == "crossmodal" and cfg.pretrain.negatives == "batch"


def check_pretrain_dp(cfg: FedmskConfig, dp: bool) -> None:
    """Refuse the in-batch cross-modal form under DP (at compose time, and at a site whose policy turns DP on)."""
    if dp and couples_batch(cfg):
        raise ConfigError(
            "config 'pretrain.negatives=batch' with DP is refused: in-batch cross-modal contrast (CLIP) uses the other "
            "patients of the batch as negatives, so one patient's gradient depends on the others and DP-SGD's "
            "per-patient clipping no longer bounds that patient's influence (the privacy guarantee would silently not "
            "hold). Use pretrain.negatives=bank (the same contrast against a fixed non-private bank), or pretrain=ssl."
        )


@register_check
def _check_pretrain(cfg: FedmskConfig) -> None:
    if cfg.pretrain.objective == "none":
        return
    check_pretrain_dp(cfg, cfg.privacy.enabled)
    if cfg.model.finetune != "all":
        raise ConfigError(f"config 'model.finetune={cfg.model.finetune}' with pretrain.objective={cfg.pretrain.objective}: "
                          f"pretraining trains the encoders, which finetune={cfg.model.finetune} freezes; use model.finetune=all")
    if cfg.pretrain.public_variance < 0:
        raise ConfigError(f"config 'pretrain.public_variance' is {cfg.pretrain.public_variance}; use 0 (off) or a weight > 0")
    if cfg.pretrain.bank_size < 2 and uses_image_bank(cfg):
        raise ConfigError(f"config 'pretrain.bank_size' is {cfg.pretrain.bank_size}; the public bank needs at least 2 images")
    if cfg.pretrain.proj_dim < 1 or cfg.pretrain.temperature <= 0 or cfg.pretrain.recon_weight < 0:
        raise ConfigError("config 'pretrain': proj_dim must be >= 1, temperature > 0 and recon_weight >= 0")
    if any(v is not None and v <= 0 for v in (cfg.pretrain.dp_batch_size, cfg.pretrain.dp_lr)):
        raise ConfigError(f"config 'pretrain.dp_batch_size' / 'pretrain.dp_lr' are {cfg.pretrain.dp_batch_size} / "
                          f"{cfg.pretrain.dp_lr}; give values > 0, or null for the privacy preset's")
    if cfg.pretrain.epsilon is not None and cfg.pretrain.epsilon <= 0:
        raise ConfigError(f"config 'pretrain.epsilon' is {cfg.pretrain.epsilon}; give this run's share of a site's "
                          f"budget (> 0), or null for what is left of it")


class Head(nn.Module):
    """Linear -> LayerNorm -> ReLU -> Linear: an MLP head with per-sample normalisation only
    (SimSiam's projector and predictor use BatchNorm, which couples the patients of a batch)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.ReLU(inplace=False),
                                 nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PretrainNet(nn.Module):
    """The task model's encoders and the heads of the pretraining objective.

    The encoders are taken from ``build_model(cfg)`` itself, so their parameter names and shapes
    are exactly the task model's (``image.*``, ``clinical.*``) and ``model.pretrained_path`` (for
    instance public weights) seeds them as it seeds the task model. For ``ssl`` the input image
    carries the two views stacked on the channel axis (``client.pretrain.TwoViews``), so the
    site's loop and Opacus see one ``(image, clinical)`` batch as for supervised training.
    """

    def __init__(self, cfg: FedmskConfig) -> None:
        super().__init__()
        from shared.models import build_model

        p = cfg.pretrain
        task_net = build_model(cfg)  # the task model as configured (segclass needs its segmentation loss to build)
        self.objective = p.objective
        image = getattr(task_net, "image", None)
        clinical = getattr(task_net, "clinical", None)
        if not isinstance(image, nn.Module):
            raise ConfigError(f"config 'pretrain.objective={p.objective}': model '{cfg.model.name}' has no image encoder "
                              f"to pretrain; use a model with one (mmcl, image_only, late_fusion, fracture3d)")
        self.image = image
        spatial = tuple(int(n) for n in cfg.task.image_size)
        self.recon_size = tuple(min(RECON_GRID, n) for n in spatial)
        # the encoder's input channels. Pretraining reads the image channel only (IMAGE_CHANNELS; the mask channels
        # shared.masks appends after it are a segmentation target, never an input); an encoder that reads more
        # (segclass's classifier: image + the U-Net's mask probabilities and uncertainty, which a pretraining job
        # has no U-Net for) gets zeros there, so those channels' weights stay at the task model's seeded init
        self.in_channels = next(m for m in image.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))).in_channels
        embed = cfg.model.embed_dim
        if p.objective == "ssl":
            self.projector = Head(embed, embed, p.proj_dim)
            self.predictor = Head(p.proj_dim, max(p.proj_dim // 2, 4), p.proj_dim) if p.ssl_loss == "simsiam" else None
        elif p.objective == "crossmodal":
            if not isinstance(clinical, nn.Module):
                raise ConfigError(f"config 'pretrain.objective=crossmodal': model '{cfg.model.name}' has no clinical "
                                  f"encoder; use model=mmcl or late_fusion, or pretrain=ssl")
            self.clinical = clinical
            self.image_proj = Head(embed, embed, p.proj_dim)
            self.clinical_proj = Head(embed, embed, p.proj_dim)
        else:
            raise ConfigError(f"config 'pretrain.objective' is '{p.objective}'; a pretraining model needs ssl or crossmodal")
        # ssl_loss=public: the public images [K, C, *size] (set_bank; a plain attribute, not a buffer: never
        # averaged, checkpointed or sent, every site holds the same ones)
        self.uses_image_bank = uses_image_bank(cfg)
        self.bank_negatives = p.objective == "ssl" and p.ssl_loss == "public"
        self.public_variance = p.public_variance  # client.trainer adds this term's (public) gradient after DP noise
        self.bank_images: torch.Tensor | None = None
        n_pixels = IMAGE_CHANNELS * math.prod(self.recon_size)
        self.image_decoder = nn.Linear(embed, n_pixels) if p.recon_weight > 0 else None
        n_clinical = self.clinical.net[0].in_features if p.objective == "crossmodal" else 0
        self.clinical_decoder = nn.Linear(embed, n_clinical) if p.recon_weight > 0 and n_clinical else None

    def set_bank(self, images: torch.Tensor) -> None:
        """The public images ``[K, C, *size]`` whose embeddings are the ``public`` objective's negatives."""
        if images.dim() != 2 + len(self.recon_size) or images.shape[0] < 1:
            raise ValueError(f"a public bank is [K, C, *{self.recon_size}] with K >= 1; got {tuple(images.shape)}")
        self.bank_images = images[:, :IMAGE_CHANNELS].float()

    def _bank_embeddings(self, device: torch.device) -> torch.Tensor:
        """The current encoder's projections of the public images, L2-normalised, without gradient (constants
        for the step: no patient's gradient flows through them, and Opacus' hooks record nothing)."""
        if self.bank_images is None:
            raise RuntimeError("pretrain.ssl_loss=public needs its public image bank (client.pretrain.attach_bank) before "
                               "a forward pass; the site loads it from pretrain.bank_root or the task's synthetic generator")
        with torch.no_grad():
            return self.projector(self.image(self._encoder_input(self.bank_images.to(device)))[0])

    def public_variance_loss(self) -> torch.Tensor:
        """VICReg variance + covariance of the public images' image embeddings (the encoder's output, what a task
        model fine-tunes on) and of their projections, with gradient: a function of the weights and public data
        only, so its gradient is public (``client.pretrain.PublicVariance`` adds it outside DP-SGD's clipping)."""
        if self.bank_images is None:
            raise RuntimeError("pretrain.public_variance needs the public image bank (client.pretrain.attach_bank)")
        h = self.image(self._encoder_input(self.bank_images.to(next(self.parameters()).device)))[0]
        head = self.projector if self.objective == "ssl" else self.image_proj
        return vicreg_variance(h) + vicreg_variance(head(h))

    def _encoder_input(self, image: torch.Tensor) -> torch.Tensor:
        """The image channel, zero-padded to the encoder's input channels (see ``in_channels``)."""
        extra = self.in_channels - IMAGE_CHANNELS
        return image if extra == 0 else torch.cat([image, image.new_zeros(image.shape[0], extra, *image.shape[2:])], dim=1)

    def encoders(self) -> dict[str, nn.Module]:
        """The modules a pretraining run keeps, by the task models' names."""
        return {name: getattr(self, name) for name in ENCODER_NAMES if isinstance(getattr(self, name, None), nn.Module)}

    def _reconstruct(self, out: dict[str, torch.Tensor], key: str, h: torch.Tensor, image: torch.Tensor) -> None:
        """The decoder's coarse copy of ``image`` from its embedding ``h``, beside the target (per sample)."""
        if self.image_decoder is not None:
            target = F.adaptive_avg_pool2d(image, self.recon_size) if image.dim() == 4 else F.adaptive_avg_pool3d(image, self.recon_size)
            out[f"recon_{key}"], out[f"target_{key}"] = self.image_decoder(h), target.flatten(1)

    def forward(self, image: torch.Tensor, clinical: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.objective == "ssl":
            views = [v[:, :IMAGE_CHANNELS] for v in image.chunk(2, dim=1)]  # [B, 2C, ...] -> two image channels
            h = [self.image(self._encoder_input(v))[0] for v in views]
            z = [self.projector(e) for e in h]
            out |= {"z1": z[0], "z2": z[1]}
            if self.bank_negatives:
                out["bank"] = self._bank_embeddings(image.device)
            if self.predictor is not None:
                out |= {"p1": self.predictor(z[0]), "p2": self.predictor(z[1])}
            for i, (e, v) in enumerate(zip(h, views), start=1):
                self._reconstruct(out, f"view{i}", e, v)
            return out
        image = image[:, :IMAGE_CHANNELS]
        h_image, h_clinical = self.image(self._encoder_input(image))[0], self.clinical(clinical)
        out |= {"z_image": self.image_proj(h_image), "z_clinical": self.clinical_proj(h_clinical)}
        self._reconstruct(out, "image", h_image, image)
        if self.clinical_decoder is not None:
            out["recon_clinical"], out["target_clinical"] = self.clinical_decoder(h_clinical), clinical
        return out


def _contrast(a: torch.Tensor, b: torch.Tensor, bank: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE of each patient's pair (a_i, b_i) against the rows of ``bank`` (L2-normalised inputs):
    the batch mean of per-patient terms."""
    pos = (a * b).sum(dim=-1, keepdim=True)
    target = torch.zeros(a.shape[0], dtype=torch.long, device=a.device)
    return 0.5 * sum(F.cross_entropy(torch.cat([pos, z @ bank.t()], dim=1) / temperature, target) for z in (a, b))


def _negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return -(F.normalize(p, dim=-1) * F.normalize(z.detach(), dim=-1)).sum(dim=-1).mean()


class PretrainLoss(nn.Module):
    """The objective's loss: ``forward(outputs, labels) -> (loss, parts)``; labels are ignored
    (unlabelled patients carry -1). Every DP-safe form is a batch mean of per-patient terms."""

    def __init__(self, cfg: FedmskConfig) -> None:
        super().__init__()
        p = cfg.pretrain
        self.objective, self.ssl_loss, self.negatives, self.temperature = p.objective, p.ssl_loss, p.negatives, p.temperature
        self.recon_weight = p.recon_weight
        self.couples_batch = couples_batch(cfg)  # client.privacy.SitePrivacy.make_private refuses a coupled loss too
        uses_bank = (p.objective == "ssl" and p.ssl_loss == "bank") or (p.objective == "crossmodal" and p.negatives == "bank")
        self.bank = _BankContrast(p.temperature, p.proj_dim) if uses_bank else None

    def forward(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        first = next(iter(outputs.values()))
        if first.shape[0] == 0:  # an empty Poisson batch under DP-SGD: no patient, no loss (the noisy step still runs)
            return empty_batch_loss({k: v for k, v in outputs.items() if k != "bank"}), {"loss": 0.0}
        if self.objective == "ssl":
            if self.ssl_loss == "public":  # the views against the public images' embeddings (detached, per step)
                bank = outputs["bank"]
                mean, sd = bank.mean(dim=0), 1.0  # the public images' mean, not the batch's
                z1, z2, bank = (F.normalize((z - mean) / sd, dim=-1) for z in (outputs["z1"], outputs["z2"], bank))
                loss = _contrast(z1, z2, bank, self.temperature)
            elif self.bank is not None:
                loss = self.bank.contrast(F.normalize(outputs["z1"], dim=-1), F.normalize(outputs["z2"], dim=-1))
            else:  # symmetric SimSiam: each view's prediction against the other view, stop-gradient on the target
                loss = 0.5 * (_negative_cosine(outputs["p1"], outputs["z2"]) + _negative_cosine(outputs["p2"], outputs["z1"]))
        else:
            zi, zc = F.normalize(outputs["z_image"], dim=-1), F.normalize(outputs["z_clinical"], dim=-1)
            if self.bank is not None:
                loss = self.bank.contrast(zi, zc)
            else:  # CLIP: the other patients of the batch are the negatives (batch-coupled)
                logits = zi @ zc.t() / self.temperature
                target = torch.arange(zi.shape[0], device=zi.device)
                loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
        parts = {"objective": float(loss.detach())}
        if self.recon_weight > 0:  # per-sample: each patient's own input, coarsely, from its own embedding
            recon = torch.stack([F.mse_loss(outputs[k], outputs["target_" + k.removeprefix("recon_")])
                                 for k in outputs if k.startswith("recon_")]).mean()
            loss = loss + self.recon_weight * recon
            parts["recon"] = float(recon.detach())
        return loss, parts | {"loss": float(loss.detach())}


SCALE_PROBES = 8  # uniform-noise images the scale check runs through the image encoder
SCALE_WARN = 10.0  # a pretrained encoder whose largest activation grew more than this many times is flagged


@torch.no_grad()
def feature_scale(cfg: FedmskConfig, encoders: dict[str, torch.Tensor]) -> dict:
    """The largest |activation| anywhere inside the image encoder, at the run's initial weights and at ``encoders``.

    Why a check of our own: under DP-SGD a long pretraining run lets the noise random-walk the weights of every
    layer a normalisation follows; no gradient restores their scale, so their norms grow and the un-normalised
    feature maps a fine-tuned task model reads grow with them (measured 30-100,000x at the DP presets' lr 0.1,
    README "Label efficiency"), while the objective, which reads a normalised embedding, shows nothing. The
    fine-tune then starts from saturated logits. No library reports this; forward hooks on the encoder's modules
    do. The inputs are ``SCALE_PROBES`` uniform-noise images from a fixed seed, no patient's: the figures are
    functions of released weights and public inputs only (post-processing, no privacy cost).

    Returns ``{"init", "final", "ratio", "inputs"}`` plus ``"warning"`` when ratio > ``SCALE_WARN``.
    """
    nets = [PretrainNet(cfg), PretrainNet(cfg)]  # the run's initial weights (seeded init or model.pretrained_path)
    state = {k: v for k, v in encoders.items() if k.startswith("image.")}
    unexpected = nets[1].load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"encoder weights do not fit {cfg.model.name}'s image encoder: {', '.join(unexpected[:3])}")
    size = tuple(int(n) for n in cfg.task.image_size)
    x = torch.rand(SCALE_PROBES, nets[0].in_channels, *size, generator=torch.Generator().manual_seed(0))
    peaks = []
    for net in nets:
        net.eval()
        seen = [0.0]

        def hook(module: nn.Module, args: tuple, out: object) -> None:
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if torch.is_tensor(t) and t.is_floating_point() and t.numel():
                    seen[0] = max(seen[0], float(t.abs().max()))

        handles = [m.register_forward_hook(hook) for m in net.image.modules()]
        try:
            net.image(x)
        finally:
            for h in handles:
                h.remove()
        peaks.append(seen[0])
    init, final = peaks
    ratio = final / init if init > 0 else float("inf")
    out = {"init": init, "final": final, "ratio": ratio,
           "inputs": f"{SCALE_PROBES} uniform-noise images (seed 0), no patient data"}
    if ratio > SCALE_WARN:
        out["warning"] = (f"the image encoder's largest activation grew {ratio:.0f}x over pretraining ({init:.3g} -> "
                          f"{final:.3g}): DP-SGD's noise has inflated weights no normalisation bounds, and a model "
                          f"fine-tuned from these weights may start saturated. Pretrain again with a larger DP batch or a lower "
                          f"lr (pretrain.dp_batch_size=256 or pretrain.dp_lr=0.01 kept the scale under DP: README "
                          f"'Label efficiency of pretraining')")
    return out
