"""Local training and evaluation at one site: the one loop both the federation and the
pooled baseline run.

``train_local`` is the single entry point for a site's training pass (in the spirit of
Opacus' ``make_private``: one call, the privacy engine plugs in through ``privacy``), so the
ClientApp, the SecAgg+ client and ``fedmsk central`` never write the loop again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from client.randomness import site_generator
from client.proximal import ProximalTerm
from shared.config import FederationConfig
from shared.losses import build_criterion
from shared.metrics import classification_metrics
from shared.models import build_model
from shared.precision import Precision
from shared.ssl import PretrainLoss, PretrainNet


class Screener(nn.Module):
    """The network and its training criterion as one module.

    The criterion can own learnable parameters (e.g. class prototypes of a per-sample
    contrastive loss); keeping both in one module means one state_dict travels, is averaged
    and checkpointed, and nothing learnable is left at a site by accident.
    """

    def __init__(self, net: nn.Module, criterion: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.criterion = criterion

    def forward(self, image: torch.Tensor, clinical: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(image, clinical)


ENCODERS = ("image", "clinical")  # the models' encoder submodules (what `fedmsk pretrain-public` trains)
NORMS = (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d, nn.InstanceNorm3d)


def apply_finetune(net: nn.Module, mode: str) -> None:
    """Freeze what ``model.finetune`` keeps fixed: the encoders ("heads"), or all but their norm layers ("norm_heads").

    With pretrained encoders, DP fine-tuning of the heads alone puts the noise on a few thousand
    parameters instead of all of them, and a frozen encoder needs no per-sample gradients.
    """
    if mode == "all":
        return
    for name in ENCODERS:
        encoder = getattr(net, name, None)
        if not isinstance(encoder, nn.Module):
            continue
        for module in encoder.modules():
            train = mode == "norm_heads" and isinstance(module, NORMS)
            for p in module.parameters(recurse=False):
                p.requires_grad_(train)


def build_screener(cfg) -> Screener:
    """Build the task's model + criterion from config (same call on server and sites); a pretraining job
    (``pretrain.objective``) is the task's encoders + the objective's heads and loss (shared.ssl)."""
    if cfg.pretrain.objective != "none":
        return Screener(PretrainNet(cfg), PretrainLoss(cfg))
    net = build_model(cfg)
    apply_finetune(net, cfg.model.finetune)
    return Screener(net, build_criterion(cfg))


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int | None) -> DataLoader:
    """A loader over ``dataset``; ``seed=None`` shuffles with a site-secret generator (client.randomness).

    A site's training loader takes None: an order derived from the run's seed would be known to
    the server. Seeds are for researcher-side loops (the pooled baseline, evaluation).
    """
    gen = site_generator("shuffle") if seed is None else torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=0)


def make_optimizer(params, fed: FederationConfig) -> torch.optim.Optimizer:
    if fed.optimizer == "sgd":
        return torch.optim.SGD(params, lr=fed.lr, momentum=0.9, weight_decay=fed.weight_decay)
    return torch.optim.Adam(params, lr=fed.lr, weight_decay=fed.weight_decay)


def _to(batch: dict, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return batch["image"].to(device), batch["clinical"].to(device), batch["label"].to(device)


@dataclass
class TrainResult:
    num_examples: int
    steps: int
    train_loss: float
    train_acc: float

    def metrics(self) -> dict[str, float]:
        return {
            "num-examples": self.num_examples,
            "steps": self.steps,
            "train_loss": self.train_loss,
            "train_acc": self.train_acc,
        }


def train_local(
    screener: Screener,
    loader: DataLoader,
    fed: FederationConfig,
    device: str,
    *,
    epochs: int | None = None,
    privacy=None,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Train ``screener`` in place for ``epochs`` (default: fed.local_epochs) passes.

    ``privacy``: a ``client.privacy.SitePrivacy`` (``make_private`` wraps module, optimizer
    and loader for DP-SGD; ``detach`` unhooks the module afterwards), or None for plain training.
    ``proximal_mu``: FedProx's pull toward the weights it starts from (client.proximal).
    """
    screener.to(device).train()
    amp = Precision(fed.precision, device, private=privacy is not None)  # federation.precision
    optimizer = make_optimizer([p for p in screener.parameters() if p.requires_grad], fed)
    proximal = ProximalTerm(screener, proximal_mu) if proximal_mu else None
    module: nn.Module = screener
    if privacy is not None:
        module, optimizer, loader = privacy.make_private(screener, optimizer, loader)
    if proximal is not None:
        proximal.attach(optimizer)  # after DP clipping and noise: the term holds no patient data
    if getattr(screener.net, "public_variance", 0.0) > 0:  # a pretraining job's public-bank term, likewise
        from client.pretrain import PublicVariance

        PublicVariance(screener, screener.net.public_variance).attach(optimizer, module)
    total_loss, total_correct, total_seen, steps = 0.0, 0, 0, 0
    for _ in range(epochs or fed.local_epochs):
        for batch in loader:
            image, clinical, label = _to(batch, device)
            if label.numel() == 0 and privacy is None:
                continue  # under DP-SGD an empty Poisson batch still takes its noisy, accounted step
            with amp.autocast():
                outputs = module(image, clinical)
                loss, _parts = screener.criterion(outputs, label)
            optimizer.zero_grad(set_to_none=True)
            amp.backward(loss)
            amp.step(optimizer, module)  # under DP: per-sample gradients to fp32 first
            steps += 1
            n = label.shape[0]
            total_loss += float(loss.detach()) * n
            if "logits" in outputs:  # a pretraining objective has no classifier (its accuracy is NaN)
                total_correct += int((outputs["logits"].detach().argmax(1) == label).sum())
            total_seen += n
    if privacy is not None:
        privacy.detach(module)  # the loss and accuracy of private batches are not released (NaN)
        return TrainResult(len(loader.dataset), steps, math.nan, math.nan)
    seen = max(total_seen, 1)
    accuracy = math.nan if isinstance(screener.criterion, PretrainLoss) else total_correct / seen
    return TrainResult(len(loader.dataset), steps, total_loss / seen, accuracy)


@torch.no_grad()
def predict(screener: Screener, loader: DataLoader, device: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Labels, class probabilities [N, C] and the mean loss over a loader (eval mode)."""
    screener.to(device).eval()
    labels, probs, loss_sum, seen = [], [], 0.0, 0
    for batch in loader:
        image, clinical, label = _to(batch, device)
        outputs = screener(image, clinical)
        loss, _ = screener.criterion(outputs, label)
        loss_sum += float(loss) * label.shape[0]
        seen += label.shape[0]
        labels.append(label.cpu().numpy())
        probs.append(torch.softmax(outputs["logits"].float(), dim=1).cpu().numpy())
    if not labels:
        return np.zeros(0, dtype=int), np.zeros((0, 2)), float("nan")
    return np.concatenate(labels), np.concatenate(probs), loss_sum / max(seen, 1)


def evaluate(screener: Screener, loader: DataLoader, device: str) -> dict[str, float]:
    """Loss, the six screening metrics and confusion counts over a loader."""
    labels, probs, loss = predict(screener, loader, device)
    out = classification_metrics(labels, probs) if labels.size else {}
    out["loss"] = loss
    out["num-examples"] = int(labels.size)
    return out
