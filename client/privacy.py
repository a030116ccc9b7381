"""Sample-level DP-SGD at a site, with the site's own budget: one entry point, like Opacus' make_private.

Usage (client/app.py)::

    privacy = SitePrivacy.open(site_dir, policy)          # the site's ledger + policy
    privacy.begin_round(run_id, rnd, planned_rounds=..., local_epochs=..., n_train=..., batch_size=...)
    train_local(..., privacy=privacy)                      # calls privacy.make_private(...) / detach(...)
    metrics |= privacy.end_round()                         # persists the accountant, returns epsilon

* Policy: the site's own file (``--node-config 'privacy-config="site_privacy.yaml"'``) wins; without
  one, the first policy a site trains under is pinned in its ledger and a server's later proposal
  can never raise it. DP is on when the site or the run asks for it.
* Noise: calibrated once per run for the whole planned schedule (planned rounds x local epochs x
  steps per epoch) against what is LEFT of the site's budget, and kept in the ledger so every
  round of the run (in any process) uses the same noise multiplier.
* Sampling: Poisson (Opacus' DPDataLoader); logical batches above ``MAX_PHYSICAL_BATCH`` go
  through Opacus' BatchMemoryManager splitting, not hand-written gradient accumulation.
* Randomness: the Poisson sampler and the noise draw from site-secret generators
  (client.randomness, OS entropy), never from the caller's loader seed, the run's seed or torch's
  fixed default seed, all of which the server can know.
* Refusals (before any step is taken): a model Opacus' validator rejects (no silent surgery), a
  batch-coupled auxiliary loss, a round that would take the site past its budget (BudgetSpent).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from client.ledger import PrivacyLedger, RoundEntry, RunPlan, Step, merge_history
from client.randomness import site_generator
from shared.config import ConfigError, FederationConfig, PrivacyConfig, load_yaml_file
from shared.losses import DP_SAFE_AUX, empty_batch_loss

if TYPE_CHECKING:
    from opacus import PrivacyEngine

# Opacus (and with it torch.distributed.tensor: 0.6 s of CPU a process here) is imported where DP is
# used, not with this module: every site message resolves its privacy policy, and a simulated site
# without DP never needs Opacus (each Ray worker imports the ClientApp when it starts).
log = logging.getLogger("fedmsk.privacy")


def import_opacus() -> None:
    """Import Opacus and register fedmsk's per-sample gradient samplers, leaving logging as it was.

    Opacus' import calls ``logging.basicConfig`` (opacus/utils/module_utils.py): where the root
    logger had no handler, every Flower and fedmsk line was printed a second time from then on.
    The handlers that import added are removed again.
    """
    root = logging.getLogger()
    before = list(root.handlers)
    import opacus  # noqa: F401

    import client.grad_samplers  # noqa: F401  (registers fedmsk's samplers with Opacus)

    for handler in [h for h in root.handlers if h not in before]:
        root.removeHandler(handler)

GRAD_SAMPLE_MODE = "hooks"  # with client.grad_samplers: the fastest valid mode for our models and losses (bench/bench_dp.py --steps)
MAX_PHYSICAL_BATCH = 64  # larger logical batches are split by Opacus' BatchMemoryManager
MAX_NOISE_MULTIPLIER = 32.0  # above this the noise drowns any gradient: a leftover budget this small counts as spent
EPS_RTOL = 1e-3
BUDGET_FLOOR = 0.02  # a leftover under 2% of the target (the calibration's slack) counts as spent  # relative slack when comparing an accountant's epsilon with the target (estimation noise)
NODE_PRIVACY_CONFIG = "privacy-config"  # node_config key: path of the site's own privacy policy YAML
POLICY_KEYS = ("target_epsilon", "delta", "max_grad_norm", "accountant", "release_noise", "release_epsilon", "release_budget",
               "optimizer", "lr", "batch_size", "local_epochs")
DP_TRAINING_KEYS = ("optimizer", "lr", "batch_size", "local_epochs")  # a policy's local-training settings under DP


class GhostCriterion(nn.Module):
    """fedmsk's criterion in the form Opacus' ghost clipping takes: per-sample losses on request.

    Ghost clipping (``grad_sample_mode="ghost"``) wraps the criterion and calls it with
    ``reduction="none"`` to get one loss per patient, then runs a second, reweighted backward.
    fedmsk's ``Criterion`` takes the model's whole output dict and returns ``(loss, parts)``, a
    batch mean; it has no ``reduction``. Every loss allowed under DP is per-sample (batch-coupled
    ones are refused), so patient i's loss is the criterion on patient i's outputs alone.
    """

    def __init__(self, criterion: nn.Module) -> None:
        super().__init__()
        self.criterion = criterion
        self.reduction = "mean"  # Opacus switches it to "none" around its call

    def forward(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        if self.reduction != "none":
            return self.criterion(outputs, labels)[0]
        n = labels.shape[0]
        if n == 0:
            return empty_batch_loss(outputs, per_sample=True)
        rows = [{k: v[i : i + 1] if torch.is_tensor(v) and v.shape[:1] == (n,) else v for k, v in outputs.items()}
                for i in range(n)]
        return torch.stack([self.criterion(row, labels[i : i + 1])[0] for i, row in enumerate(rows)])


def prime_empty_batches(loader: DataLoader) -> None:
    """Tell Opacus' Poisson loader what an empty batch of this dataset looks like before it draws one.

    Poisson sampling draws an empty batch now and then (with probability about e^-batch for the
    first), and DP-SGD must still take its noisy, accounted step on it. Opacus' ``CollateFnWithEmpty``
    learns the empty batch's structure from the first non-empty batch; when the very first batch of
    a loader is empty it builds one from ``for x in dataset[0]`` instead, which for fedmsk's dict
    items iterates the keys and stops the round (``TypeError: zeros(): argument 'dtype' must be
    torch.dtype, not type``; at a site's batch 4, about one round in 55). Opacus has no option for
    dict items, so the wrapper's template is set here: one item collated (the structure Opacus itself
    reads from ``dataset[0]``) and cut to zero patients, so no patient's values stay in it.
    """
    from opacus.data_loader import CollateFnWithEmpty

    collate = loader.collate_fn
    if not isinstance(collate, CollateFnWithEmpty) or collate.wrapped_collator_fn is None or collate.first_batch is not None:
        return
    one = collate.wrapped_collator_fn([loader.dataset[0]])
    collate.first_batch = collate._make_empty_batch(one)  # its shapes and dtypes, batch dimension 0


class BudgetSpent(RuntimeError):
    """The site declines to train: the next round would take it past its privacy budget.

    The ClientApp lets it propagate; Flower turns it into an error reply whose reason (this
    message) the server logs for the site and the round goes on with the other sites.
    """


def epsilon_of(history: list[Step], delta: float, accountant: str) -> float:
    """Epsilon of a history of noisy steps, computed by the Opacus accountant the site uses."""
    return _epsilon(tuple(merge_history(history)), delta, accountant)


@lru_cache(maxsize=256)
def _epsilon(history: tuple[Step, ...], delta: float, accountant: str) -> float:
    """Cached: a PRV evaluation takes seconds on a CPU and the same history is asked about repeatedly."""
    if not history:
        return 0.0
    import_opacus()
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta))


def calibrate_noise(
    history: list[Step], sample_rate: float, steps: int, target_epsilon: float, delta: float, accountant: str
) -> float:
    """Smallest noise multiplier (to ~0.5% in epsilon) such that ``history`` + ``steps`` new steps stay within target.

    Like Opacus' ``get_noise_multiplier`` but composed with what the site has already spent, so
    a second run only gets the budget that is left. log(epsilon) is close to linear in
    log(sigma), so a secant search in log-log space needs a handful of accountant calls (a PRV
    call costs seconds on a CPU) where bisection needs a dozen.
    """
    spent = epsilon_of(history, delta, accountant)
    if spent >= target_epsilon * (1 - BUDGET_FLOOR):
        raise BudgetSpent(
            f"budget spent: epsilon {spent:.3f} of the site's {target_epsilon:g} is already used (delta {delta:g}); "
            f"the site declines to train"
        )

    def f(sigma: float) -> float:
        return math.log(epsilon_of(list(history) + [(sigma, sample_rate, steps)], delta, accountant) / target_epsilon)

    x0, f0 = 1.0, f(1.0)
    x1 = 2.0 if f0 > 0 else 0.5
    f1 = f(x1)
    for _ in range(10):
        if -0.005 < f1 <= 0 or f1 == f0:
            break
        x2 = math.exp(math.log(x1) - f1 * (math.log(x1) - math.log(x0)) / (f1 - f0))
        x0, f0, x1 = x1, f1, min(max(x2, x1 / 4), x1 * 4, 2 * MAX_NOISE_MULTIPLIER)
        f1 = f(x1)
    while f1 > 0 and x1 <= MAX_NOISE_MULTIPLIER:
        x1 *= 1.01
        f1 = f(x1)
    if x1 > MAX_NOISE_MULTIPLIER:
        raise BudgetSpent(
            f"budget spent: epsilon {spent:.3f} of the site's {target_epsilon:g} is used; what is left would need "
            f"a noise multiplier above {MAX_NOISE_MULTIPLIER:g} for {steps} more steps, which drowns the "
            f"gradients, so the site declines to train"
        )
    return x1


def load_policy_file(path: str | Path) -> PrivacyConfig:
    """Read the site operator's own privacy policy (fields of configs/privacy/*.yaml)."""
    policy = load_yaml_file(path, PrivacyConfig, "site privacy policy", "copy configs/privacy/site.yaml and set your budget")
    check_policy(policy, str(path))
    return policy


def check_policy(policy: PrivacyConfig, origin: str) -> None:
    if policy.accountant not in ("prv", "rdp"):
        raise ConfigError(f"{origin}: 'accountant' is '{policy.accountant}'; allowed: prv, rdp")
    if policy.target_epsilon <= 0 or not 0 < policy.delta < 1 or policy.max_grad_norm <= 0:
        raise ConfigError(f"{origin}: target_epsilon and max_grad_norm must be > 0 and delta in (0, 1)")
    if policy.optimizer not in (None, "adam", "sgd"):
        raise ConfigError(f"{origin}: 'optimizer' is '{policy.optimizer}'; allowed: adam, sgd (or null: the run's)")
    if any(getattr(policy, k) is not None and getattr(policy, k) <= 0 for k in ("lr", "batch_size", "local_epochs")):
        raise ConfigError(f"{origin}: lr, batch_size and local_epochs must be > 0 (or null: the run's)")
    if policy.release_noise not in ("none", "laplace", "gaussian"):
        raise ConfigError(f"{origin}: 'release_noise' is '{policy.release_noise}'; allowed: none, laplace, gaussian")
    if policy.release_noise != "none" and not 0 < policy.release_epsilon <= policy.release_budget:
        raise ConfigError(f"{origin}: release_epsilon must be > 0 and at most release_budget")


def resolve_policy(node_config: dict[str, Any], proposed: PrivacyConfig, site_dir: str | Path) -> PrivacyConfig:
    """The policy this site trains under: its own file, else its pinned ledger policy, else the run's proposal.

    DP is on when either the site or the run asks for it: a run can ask a site for DP, and a
    site that requires DP never trains without it.
    """
    if NODE_PRIVACY_CONFIG in node_config:
        own = load_policy_file(str(node_config[NODE_PRIVACY_CONFIG]))
        own.enabled = own.enabled or proposed.enabled
        return own
    pinned = PrivacyLedger.load(site_dir).policy
    if pinned:
        return PrivacyConfig(enabled=proposed.enabled or bool(pinned.get("enabled")), **_pinned_fields(pinned))
    return PrivacyConfig(**asdict(proposed))


def dp_training(fed: FederationConfig, policy: PrivacyConfig) -> FederationConfig:
    """The local-training settings a site uses under DP: the policy's, where it sets them.

    Hyperparameters tuned without noise (Adam at lr 0.002) crawl under DP-SGD's noise; the
    privacy presets carry settings chosen under DP on synthetic federations (bench/bench_dp.py).
    """
    return replace(fed, **{k: getattr(policy, k) for k in DP_TRAINING_KEYS if getattr(policy, k) is not None})


def _pinned_fields(pinned: dict[str, Any]) -> dict[str, Any]:
    """The policy fields a ledger pinned (ledgers from before the release fields lack those: defaults)."""
    return {k: pinned[k] for k in POLICY_KEYS if k in pinned}


class SitePrivacy:
    """A site's DP-SGD engine and ledger for one round (see the module docstring for the call order)."""

    def __init__(self, ledger: PrivacyLedger, policy: PrivacyConfig) -> None:
        self.ledger = ledger
        self.policy = policy
        self._plan: RunPlan | None = None
        self._round: tuple[str, int] | None = None
        self._engine: PrivacyEngine | None = None
        self._batch_size = 0

    @classmethod
    def open(cls, site_dir: str | Path, policy: PrivacyConfig) -> SitePrivacy:
        """Open the site's ledger; the first policy a site uses is pinned in it."""
        check_policy(policy, f"privacy policy of site {site_dir}")
        ledger = PrivacyLedger.load(site_dir)
        pinned = {k: getattr(policy, k) for k in POLICY_KEYS} | {"enabled": True}
        if ledger.policy != pinned:
            if ledger.policy:
                log.info("site %s: privacy policy changed from %s to %s", site_dir, ledger.policy, pinned)
            ledger.policy = pinned
            ledger.save()
        return cls(ledger, policy)

    # -- budget ---------------------------------------------------------------------------
    def spent(self) -> float:
        """Epsilon the site has spent so far, over every run (at the policy's delta)."""
        return epsilon_of(self.ledger.history, self.policy.delta, self.policy.accountant)

    def check_budget(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon after ``steps`` more steps; raises BudgetSpent when it would exceed the target."""
        after = epsilon_of(
            self.ledger.history + [(noise_multiplier, sample_rate, steps)], self.policy.delta, self.policy.accountant
        )
        if after > self.policy.target_epsilon * (1 + EPS_RTOL):
            raise BudgetSpent(
                f"budget spent: this round ({steps} steps at noise {noise_multiplier:.3f}) would take the site "
                f"from epsilon {self.spent():.3f} to {after:.3f}, past its target {self.policy.target_epsilon:g} "
                f"(delta {self.policy.delta:g}); the site declines to train. See `fedmsk privacy <site_dir>`."
            )
        return after

    def begin_round(
        self, run_id: str, server_round: int, *, planned_rounds: int, local_epochs: int, n_train: int, batch_size: int,
        init: str = "random init", objective: str = "supervised", run_epsilon: float | None = None,
    ) -> RunPlan:
        """Plan (once per run) and check the budget for this round, before any data is touched.

        ``run_epsilon``: this run may spend at most that much on its own (a pretraining run's share of
        the budget, ``pretrain.epsilon``, so fine-tuning has budget left); the site's total stays capped too.
        """
        if n_train < 1:
            raise ValueError("DP-SGD needs at least one training patient")
        steps_per_epoch = math.ceil(n_train / batch_size)  # Opacus' Poisson loader: len(loader) steps, rate 1/len
        sample_rate = 1.0 / steps_per_epoch
        round_steps = local_epochs * steps_per_epoch
        plan = self.ledger.plans.get(run_id)
        if plan is None or plan.sample_rate != sample_rate:
            planned = max(planned_rounds - server_round + 1, 1) * round_steps
            sigma = calibrate_noise(
                self.ledger.history, sample_rate, planned, self.policy.target_epsilon, self.policy.delta, self.policy.accountant
            )
            if run_epsilon is not None:  # the noise that keeps this run's own steps within its share, if larger
                own = [(r.noise_multiplier, r.sample_rate, r.steps) for r in self.ledger.rounds if r.run_id == run_id]
                sigma = max(sigma, calibrate_noise(own, sample_rate, planned, run_epsilon, self.policy.delta, self.policy.accountant))
            plan = RunPlan(sigma, sample_rate, planned, self.policy.target_epsilon, init, objective)
            self.ledger.plans[run_id] = plan
            self.ledger.save()
            log.info("run %s: noise multiplier %.3f for %d planned steps (sample rate %.4f)", run_id, sigma, planned, sample_rate)
        self.check_budget(plan.noise_multiplier, plan.sample_rate, round_steps)
        self._plan, self._round, self._batch_size = plan, (run_id, server_round), batch_size
        return plan

    # -- training -------------------------------------------------------------------------
    def make_private(self, module: nn.Module, optimizer: Optimizer, loader: DataLoader) -> tuple[nn.Module, Optimizer, DataLoader]:
        """Wrap model, optimizer and loader for DP-SGD; refuse what cannot be made private."""
        if self._plan is None:
            raise RuntimeError("SitePrivacy.begin_round must run before make_private (it plans the noise and checks the budget)")
        criterion = getattr(module, "criterion", None)
        if criterion is not None and getattr(criterion, "couples_batch", False):
            raise ConfigError(
                "the auxiliary loss couples the patients of a batch, which DP-SGD cannot make private; "
                f"use model.aux_loss one of {DP_SAFE_AUX}"
            )
        import_opacus()
        from opacus import PrivacyEngine
        from opacus.utils.batch_memory_manager import wrap_data_loader
        from opacus.validators import ModuleValidator

        ModuleValidator.validate(module, strict=True)  # no silent surgery: the model must be DP-ready as built
        run_id, rnd = self._round or ("", 0)
        device = next(module.parameters()).device
        # Opacus' Poisson sampler draws from the loader's generator: give it a site-secret one
        loader = DataLoader(loader.dataset, batch_size=loader.batch_size, num_workers=loader.num_workers,
                            collate_fn=loader.collate_fn, generator=site_generator("sampling", run_id, rnd))
        engine = PrivacyEngine(accountant=self.policy.accountant)
        engine.accountant.history = list(self.ledger.history)
        module, optimizer, loader = engine.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=self._plan.noise_multiplier,
            max_grad_norm=self.policy.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=GRAD_SAMPLE_MODE,
            noise_generator=site_generator("noise", run_id, rnd, device=device),
        )
        prime_empty_batches(loader)
        if abs(1.0 / len(loader) - self._plan.sample_rate) > 1e-12:
            raise RuntimeError(f"loader has {len(loader)} batches; the plan assumed sample rate {self._plan.sample_rate}")
        if self._batch_size > MAX_PHYSICAL_BATCH:
            loader = wrap_data_loader(data_loader=loader, max_batch_size=MAX_PHYSICAL_BATCH, optimizer=optimizer)
        self._engine = engine
        return module, optimizer, loader

    def detach(self, module: nn.Module) -> None:
        """Remove Opacus' hooks so the plain model can be saved and sent."""
        close = getattr(module, "_close", None)
        if close is not None:
            close()

    def end_round(self) -> dict[str, float]:
        """Persist the accountant after the round; return the metrics that travel to the server."""
        if self._engine is None or self._plan is None or self._round is None:
            raise RuntimeError("end_round without a private round (begin_round + make_private)")
        before = self.spent()
        steps_before = self.ledger.steps_taken()
        self.ledger.history = merge_history(self._engine.accountant.history)
        steps = self.ledger.steps_taken() - steps_before
        total = self.spent()
        run_id, rnd = self._round
        self.ledger.rounds.append(
            RoundEntry(run_id, rnd, steps, self._plan.noise_multiplier, self._plan.sample_rate, total - before, total, self.policy.delta)
        )
        self.ledger.save()
        self._engine = None
        return {"dp": 1.0, "epsilon": total, "delta": self.policy.delta, "steps": steps}


def budget_report(site_dir: str | Path, policy_file: str | Path | None = None) -> dict[str, Any]:
    """What `fedmsk privacy <site_dir>` shows: the policy, epsilon per run and round, and what is left.

    Epsilon is recomputed from the ledger's accountant history (not summed from the rounds:
    epsilons compose sub-additively), at the site's pinned policy or its own policy file.
    """
    ledger = PrivacyLedger.load(site_dir)
    if policy_file is not None:
        policy = load_policy_file(policy_file)
    elif ledger.policy:
        policy = PrivacyConfig(enabled=True, **_pinned_fields(ledger.policy))
    else:
        return {"ledger": str(ledger.path), "policy": None, "spent": 0.0, "left": None, "steps": 0, "runs": []}
    spent = epsilon_of(ledger.history, policy.delta, policy.accountant)
    runs: dict[str, dict[str, Any]] = {}
    for entry in ledger.rounds:
        run = runs.setdefault(entry.run_id, {"run_id": entry.run_id, "rounds": [], "steps": 0, "epsilon": 0.0})
        run["rounds"].append(asdict(entry))
        run["steps"] += entry.steps
        run["epsilon"] += entry.epsilon_round
        plan = ledger.plans.get(entry.run_id)
        run["noise_multiplier"] = plan.noise_multiplier if plan else entry.noise_multiplier
        run["planned_steps"] = plan.planned_steps if plan else None
        run["objective"] = plan.objective if plan else "supervised"  # what the steps trained (pretraining objective)
    return {
        "ledger": str(ledger.path),
        "policy": {k: getattr(policy, k) for k in POLICY_KEYS},
        "spent": spent,
        "left": max(policy.target_epsilon - spent, 0.0),
        "steps": ledger.steps_taken(),
        "runs": list(runs.values()),
    }


# -- client-level DP (DP-FedAvg): the accounting the server-side wrapper needs -----------------
def client_level_noise(target_epsilon: float, delta: float, rounds: int) -> float:
    """Noise multiplier for DP-FedAvg with every site in every round (no sampling amplification).

    Each round releases one Gaussian-noised average of clipped site updates, i.e. one step at
    sample rate 1 of the same mechanism DP-SGD composes, so Opacus' RDP accountant does the
    accounting. Use with ``server.strategy.with_client_level_dp``.
    """
    return calibrate_noise([], 1.0, rounds, target_epsilon, delta, "rdp")


def client_level_epsilon(noise_multiplier: float, delta: float, rounds: int) -> float:
    """Client-level epsilon after ``rounds`` DP-FedAvg rounds with every site taking part."""
    return epsilon_of([(noise_multiplier, 1.0, rounds)], delta, "rdp")
