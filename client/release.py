"""Noised, accounted release of evaluation counts (a site's policy: ``release_noise``).

DP-SGD covers the patients a site trains on; the validation and test patients are never
trained on, so the metrics a site reports about them every round are outside that guarantee.
A site whose policy sets ``release_noise: laplace | gaussian`` releases them as a counting
query under its own budget instead:

* every count-type metric (the confusion counts, and each score histogram shared.messages
  names as a count) gets noise calibrated to one patient's effect: adding or removing one
  patient moves one cell of the confusion table by 1 (binary; C cells for C > 2 classes, whose
  counts are summed one-vs-rest) and one bin of each histogram by 1;
* the metrics derived from counts (ACC, SEN, SPC, PRE, F1, num-examples, and AUC from the score
  histograms) are recomputed from the noised counts (post-processing costs nothing); every other
  value (loss, anything computed from per-patient scores) is withheld (NaN);
* the cost is booked in the site's ledger per split (val and test are disjoint patients, so
  each split composes only with itself: Laplace releases add up, Gaussian ones compose under
  Opacus' RDP accountant), and a split whose budget (``release_budget``) would be exceeded is
  not answered any more (ReleaseRefused -> an error reply; the round goes on).

``release_intensity`` releases a site's intensity statistics for federated domain-adaptive
denormalisation (shared.dad, client.dad) the same way: bounded sums, noised, booked as a "train"
split release against the same budget.

Nothing in Opacus or Flower noises a released metric, hence this module; the accounting for the
Gaussian case is Opacus' (client.privacy.epsilon_of / calibrate_noise at sample rate 1).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

import numpy as np

from client.ledger import PrivacyLedger, ReleaseEntry
from client.privacy import calibrate_noise, epsilon_of
from client.randomness import site_seed
from shared.config import PrivacyConfig
from shared.grading import pool_grading
from shared.messages import CONFUSION_KEYS, NUM_EXAMPLES, is_count_key
from shared.metrics import HIST_KEYS, counts_metrics, histogram_auc, histograms_of

NOT_RELEASED = ("loss", "screen_auc")  # from per-patient scores, never recomputable from the released counts


class ReleaseRefused(RuntimeError):
    """The site declines to release: this split's release budget is spent."""


def count_groups(keys: list[str], n_classes: int) -> dict[str, tuple[list[str], int]]:
    """Count keys grouped by what one patient can move: {group: (keys, L1 sensitivity)}.

    Confusion counts are one group (sensitivity 1, or C summed one-vs-rest tables for C > 2
    classes); the negative and positive score histograms together are one group of sensitivity 1
    (a patient falls in one bin of one of them); any other count family (its keys without the
    trailing digits, e.g. a grade confusion matrix ``cm_<t><p>``) is one group of sensitivity 1.
    """
    groups: dict[str, tuple[list[str], int]] = {}
    confusion = [k for k in keys if k in CONFUSION_KEYS]
    if confusion:
        groups["confusion"] = (confusion, 1 if n_classes == 2 else n_classes)
    hist = [k for k in keys if k in HIST_KEYS]
    if hist:
        groups["histogram"] = (hist, 1)
    for key in keys:
        if key in CONFUSION_KEYS or key in HIST_KEYS or key == NUM_EXAMPLES or not is_count_key(key):
            continue
        family = re.sub(r"[_-]?\d+$", "", key)
        members, sens = groups.get(family, ([], 1))
        groups[family] = (members + [key], sens)
    return groups


def _split_cost(ledger: PrivacyLedger, split: str, policy: PrivacyConfig, extra: list[float], mechanism: str | None = None) -> float:
    """Epsilon of every release of ``split`` in the ledger plus ``extra`` ones of ``mechanism``
    (epsilons for Laplace, noise multipliers sigma / L2-sensitivity for Gaussian; default: the policy's).

    Laplace releases add up (pure epsilon); Gaussian ones compose under RDP at the policy's delta; the
    two sums add (basic composition), so a site that switched mechanisms keeps every earlier release.
    """
    mechanism = mechanism or policy.release_noise
    past = [r for r in ledger.releases if r.split == split]
    laplace = sum(r.epsilon for r in past if r.mechanism == "laplace")
    zs = [r.noise_scale / r.sensitivity for r in past if r.mechanism != "laplace"]
    if mechanism == "laplace":
        laplace += sum(extra)
    else:
        zs += extra
    return laplace + (epsilon_of([(z, 1.0, 1) for z in zs], policy.delta, "rdp") if zs else 0.0)


def _mechanism(policy: PrivacyConfig, ledger: PrivacyLedger, split: str, mechanism: str, l1: float, l2: float,
               rng: np.random.Generator) -> tuple[float, float, float, float, Callable[[], float]]:
    """(noise scale, sensitivity, cost, the split's composed total, a noise draw) of one more release of
    ``split`` at ``policy.release_epsilon``; ReleaseRefused when the total would pass ``release_budget``."""
    if mechanism == "laplace":
        sensitivity = float(l1)
        scale = sensitivity / policy.release_epsilon
        total = _split_cost(ledger, split, policy, [policy.release_epsilon], mechanism)
        draw = lambda: rng.laplace(0.0, scale)  # noqa: E731
    else:
        sensitivity = float(l2)
        z = calibrate_noise([], 1.0, 1, policy.release_epsilon, policy.delta, "rdp")
        scale = z * sensitivity
        total = _split_cost(ledger, split, policy, [z], mechanism)
        draw = lambda: rng.normal(0.0, scale)  # noqa: E731
    cost = total - _split_cost(ledger, split, policy, [], mechanism)
    if total > policy.release_budget * (1 + 1e-3):
        raise ReleaseRefused(
            f"release budget spent: one more {split} release would take the {split} patients to epsilon {total:.2f}, "
            f"past the site's release_budget {policy.release_budget:g}; the site declines to report {split} "
            f"{'metrics' if split in ('val', 'test') else 'statistics'}"
        )
    return scale, sensitivity, cost, total, draw


def release_counts(
    metrics: Mapping[str, float], policy: PrivacyConfig, ledger: PrivacyLedger, *, run_id: str, rnd: int, split: str,
    n_classes: int,
) -> dict[str, float]:
    """The metrics with every count noised and the rest recomputed or withheld; books the release."""
    groups = count_groups(list(metrics), n_classes)
    l1 = sum(sens for _, sens in groups.values())
    l2 = math.sqrt(sum(sens**2 for _, sens in groups.values()))
    rng = np.random.default_rng(site_seed("release", run_id, rnd, split))
    scale, sensitivity, cost, total, draw = _mechanism(policy, ledger, split, policy.release_noise, l1, l2, rng)
    # every value that is neither a noised count nor recomputed from noised counts is withheld (NaN)
    out = {k: math.nan for k in metrics}
    for keys, _ in groups.values():
        for key in keys:
            out[key] = max(0.0, float(metrics[key]) + draw())  # clamping is post-processing
    if all(k in out for k in CONFUSION_KEYS):
        tp, fp, tn, fn = (out[k] for k in ("tp", "fp", "tn", "fn"))
        out[NUM_EXAMPLES] = (tp + fp + tn + fn) / (1 if n_classes == 2 else n_classes)
        if n_classes == 2:  # macro averages (C > 2) need the per-class tables: pool_grading below
            out.update({k: v for k, v in counts_metrics(tp, fp, tn, fn).items() if k in metrics})
    out.update(pool_grading([out]))  # grade tasks: per-class F1, macro averages, screening SEN/SPC from the noised cells
    if "auc" in metrics and all(k in out for k in HIST_KEYS):
        out["auc"] = histogram_auc(*histograms_of(out))
    for key in NOT_RELEASED:
        if key in out:
            out[key] = math.nan
    ledger.releases.append(ReleaseEntry(run_id, rnd, split, policy.release_noise, scale, sensitivity, cost, total, policy.delta))
    ledger.save()
    return out


INTENSITY_SPLIT = "train"  # the patients a site trains and pretrains on: what its intensity statistics describe


def release_intensity(images: np.ndarray, policy: PrivacyConfig, ledger: PrivacyLedger, *, run_id: str) -> dict[str, float]:
    """A site's intensity statistics for federated domain-adaptive denormalisation (shared.dad), noised.

    The statistic is ``shared.dad.intensity_sums`` of the site's training images (per-image mean and
    std summed, and the count), each bounded per patient, so the release is a bounded-sum query:
    Laplace (L1 sensitivity) or Gaussian (L2, accounted under RDP) noise at ``release_epsilon``, the
    mechanism of the site's ``release_noise`` (Gaussian when that is none: these values never leave a
    site raw). Booked in the ledger as a release of the "train" split, composed with the split's earlier
    releases against ``release_budget`` (ReleaseRefused past it). The training patients' DP-SGD epsilon
    and this release compose by addition (README, "Domain-adaptive denormalisation").
    """
    from shared.dad import SENSITIVITY, intensity_sums

    mechanism = policy.release_noise if policy.release_noise != "none" else "gaussian"
    l1 = sum(SENSITIVITY.values())
    l2 = math.sqrt(sum(v * v for v in SENSITIVITY.values()))
    rng = np.random.default_rng(site_seed("release", run_id, 0, INTENSITY_SPLIT))
    scale, sensitivity, cost, total, draw = _mechanism(policy, ledger, INTENSITY_SPLIT, mechanism, l1, l2, rng)
    out = {k: v + draw() for k, v in intensity_sums(images).items()}
    ledger.releases.append(ReleaseEntry(run_id, 0, INTENSITY_SPLIT, mechanism, scale, sensitivity, cost, total, policy.delta))
    ledger.save()
    return out
