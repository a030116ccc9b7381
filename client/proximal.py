"""FedProx's proximal term at a site: mu/2 * ||w - w_global||^2, added to the gradient.

Its gradient, ``mu * (w - w_global)``, depends on the weights only, never on a patient.
It is therefore added to the parameters' gradients *after* DP-SGD has clipped the
per-sample gradients and added noise, just before the inner optimizer updates the weights
(a step pre-hook on Opacus' ``original_optimizer``). Two consequences, both intended:

* the term is not clipped: written into the loss, it would enter every per-sample gradient
  and be clipped and averaged with the data term, shrinking the pull toward the global model
  whenever clipping is active;
* it costs no privacy: it is a function of the current weights (already a DP release of
  the training so far) and of the global weights the server sent (public to the site), so
  the accountant's guarantee for the data gradient is unchanged (post-processing).

Without DP the hook sits on the plain optimizer, which is the same as adding the term to
the loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.optim import Optimizer


class ProximalTerm:
    """Pull the trainable parameters toward a snapshot of themselves (the global model)."""

    def __init__(self, module: nn.Module, mu: float) -> None:
        if mu < 0:
            raise ValueError(f"proximal mu must be >= 0, got {mu}")
        self.mu = float(mu)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.anchor = [p.detach().clone() for p in self.params]

    def distance(self) -> float:
        """||w - w_global|| now (for tests and logs)."""
        return float(sum(((p.detach() - a) ** 2).sum() for p, a in zip(self.params, self.anchor)) ** 0.5)

    @torch.no_grad()
    def add_gradient(self) -> None:
        for p, anchor in zip(self.params, self.anchor):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(p.detach() - anchor, alpha=self.mu)

    def attach(self, optimizer: Optimizer):
        """Run before every real update of ``optimizer`` (after clipping and noise). Returns the hook handle."""
        return after_noise(optimizer, self.add_gradient)


def after_noise(optimizer: Optimizer, add_gradient: Callable[[], None]):
    """Call ``add_gradient`` before every real update of ``optimizer``: with Opacus' DPOptimizer, on its
    inner optimizer, i.e. after the per-sample clipping and the noise (a gradient of the weights and
    public data only, as the module docstring argues). Returns the hook handle."""
    inner = getattr(optimizer, "original_optimizer", optimizer)
    return inner.register_step_pre_hook(lambda opt, args, kwargs: add_gradient())
