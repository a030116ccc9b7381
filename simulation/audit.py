"""Empirical privacy audit of a site's DP-SGD: canaries, one training run, a lower bound on epsilon.

The guarantee the ledger reports is arithmetic (the accountant); this audit measures it.
Following Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS
2023): ``m`` canary patients are each put into the site's training set with probability 1/2,
independently; the site trains once (``client.trainer.train_local`` with ``client.privacy``,
exactly as a round does); an auditor who sees only the final weights guesses, for the canaries
it is most sure of, which were included. Under epsilon-DP the number of correct guesses is
stochastically dominated by Binomial(guesses, e^eps / (1 + e^eps)), so the largest epsilon that
this binomial makes unlikely (p < ``beta``) at the observed count is a lower bound on the true
epsilon. (The delta term of their theorem, about delta x canaries, is ignored: 1e-5 x a few
hundred canaries moves the bound by far less than its sampling error.)

The canaries are the strongest white-box kind for the clinical logistic regression: canary i
has the value 1 in its own otherwise-unused clinical input (and label 1), so its inclusion
shows up only in the weight of that input, and the auditor scores each canary by that weight.
Without DP an included canary's weight moves and an excluded one's stays at zero: the audit
finds every canary, and its lower bound passes a small claimed epsilon, so the audit can fail.

No library here audits DP-SGD empirically (Opacus accounts, it does not audit), hence this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import binom
from torch.utils.data import Dataset

from client.privacy import SitePrivacy
from client.trainer import Screener, make_loader, train_local
from shared.config import FedmskConfig, PrivacyConfig
from shared.losses import build_criterion
from shared.models import build_model


def epsilon_lower_bound(correct: int, guesses: int, beta: float = 0.05) -> float:
    """Largest epsilon with P[Binomial(guesses, e^eps/(1+e^eps)) >= correct] <= beta (0 if none)."""
    if guesses == 0 or binom.sf(correct - 1, guesses, 0.5) > beta:
        return 0.0
    low, high = 0.0, 50.0
    for _ in range(60):
        mid = (low + high) / 2
        p = 1.0 / (1.0 + math.exp(-mid))
        if binom.sf(correct - 1, guesses, p) <= beta:
            low = mid
        else:
            high = mid
    return low


class _Rows(Dataset):
    def __init__(self, clinical: torch.Tensor, labels: torch.Tensor) -> None:
        self.clinical, self.labels = clinical, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": torch.zeros(1, 1, 1), "clinical": self.clinical[i], "label": self.labels[i]}


@dataclass
class AuditResult:
    canaries: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    epsilon_claimed: float | None  # None: trained without DP


def canary_audit(
    cfg: FedmskConfig, site_dir, *, policy: PrivacyConfig | None, canaries: int = 200, patients: int = 100,
    guesses: int = 100, epochs: int = 3, seed: int = 0,
) -> AuditResult:
    """Train the clinical logistic regression once at one site with ``canaries`` coin-flip canaries
    (DP-SGD under ``policy``, or plain training when None) and audit the final weights."""
    rng = np.random.default_rng(seed)
    k = 5  # the real patients' clinical features
    real_x = np.zeros((patients, k + canaries), np.float32)
    real_x[:, :k] = rng.normal(size=(patients, k))
    real_y = (real_x[:, 0] + 0.5 * rng.normal(size=patients) > 0).astype(np.int64)
    included = rng.random(canaries) < 0.5
    canary_x = np.zeros((canaries, k + canaries), np.float32)
    canary_x[np.arange(canaries), k + np.arange(canaries)] = 1.0
    x = np.concatenate([real_x, canary_x[included]])
    y = np.concatenate([real_y, np.ones(int(included.sum()), np.int64)])
    data = _Rows(torch.from_numpy(x), torch.from_numpy(y))

    screener = Screener(build_model(cfg, n_clinical=k + canaries), build_criterion(cfg))
    fed = cfg.federation
    privacy = None
    if policy is not None:
        privacy = SitePrivacy.open(site_dir, policy)
        privacy.begin_round("audit", 1, planned_rounds=1, local_epochs=epochs, n_train=len(data), batch_size=fed.batch_size)
    train_local(screener, make_loader(data, fed.batch_size, shuffle=True, seed=None), fed, "cpu", epochs=epochs,
                privacy=privacy)
    epsilon = privacy.end_round()["epsilon"] if privacy is not None else None

    weight = screener.net.linear.weight.detach()
    score = (weight[1, k:] - weight[0, k:]).numpy()  # the canary's own input pushes toward class 1
    order = np.argsort(score)
    half = guesses // 2
    correct = int(included[order[-half:]].sum() + (~included[order[:half]]).sum())
    return AuditResult(canaries, 2 * half, correct, epsilon_lower_bound(correct, 2 * half), epsilon)
