"""Domain-adaptive denormalisation (DAD): re-style a site's image intensities with another domain's statistics.

AdaIN-style, per image: x' = (x - mean(x)) / std(x) * std_t + mean_t, clipped to [0, 1], where
(mean_t, std_t) is a target domain's *profile*. A site that trains on its own scanner's look
sees, through DAD, what its patients would look like from other scanners; the label is unchanged.

Another hospital's intensity statistics are private (they describe its patients and scanner), so a
profile is only ever one of:

* ``public``: profiles written in the config (``task.dad_profiles``, e.g. measured on synthetic or
  public data); no site's data is involved;
* ``federated``: each site releases its intensity statistics once per run through the DP release
  machinery (``client.release.release_intensity``: bounded sums + a count, Gaussian or Laplace
  noise, booked in the site's ledger, refused past its release budget); the server turns the noised
  releases into one profile per releasing site plus their pooled mean (``profiles_from_releases``,
  post-processing), and sends them in the job config. A site never sees another's raw values.

The per-image source statistics are the image's own (instance normalisation), so one patient's
augmented input depends on that patient and the released profiles only: DAD is per-sample and
composes with DP-SGD. Intensity-level only; re-normalising normalisation-layer features is left out
(the encoders' GroupNorm/LayerNorm have no running statistics to swap).

MONAI has intensity transforms (``ScaleIntensity``, ``HistogramNormalize``) but none that maps an
image onto a target mean/std drawn from a set of domain profiles, hence ``DomainDenormalised``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from monai.transforms import MapTransform, RandomizableTransform

from shared.config import DadProfile, TaskConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fedmsk.dad")
MIN_STD = 0.01  # a flat image (std ~ 0) is left as it is; a profile's std is kept at least this
STD_BOUND = 0.5  # the std of values in [0, 1] is at most 0.5: the bound of a released std sum per patient
SUMS = ("sum_mean", "sum_std", "count")
SENSITIVITY = {"sum_mean": 1.0, "sum_std": STD_BOUND, "count": 1.0}  # one patient added or removed moves each by at most this


def intensity_sums(images: np.ndarray) -> dict[str, float]:
    """The site's statistic as bounded sums over its images ([N, 1, ...] in [0, 1]): per-image mean
    and std summed, and the count. Each patient moves them by at most ``SENSITIVITY``."""
    flat = np.clip(images.reshape(len(images), -1).astype(np.float64), 0.0, 1.0)
    return {"sum_mean": float(flat.mean(axis=1).sum()) if len(flat) else 0.0,
            "sum_std": float(flat.std(axis=1).sum()) if len(flat) else 0.0, "count": float(len(flat))}


def profile_of(sums: Mapping[str, float], name: str, source: str) -> DadProfile:
    """(noised) sums -> a profile; clamping is post-processing of the release."""
    n = max(float(sums["count"]), 1.0)
    return DadProfile(name=name, mean=float(np.clip(sums["sum_mean"] / n, 0.0, 1.0)),
                      std=float(np.clip(sums["sum_std"] / n, MIN_STD, STD_BOUND)), source=source)


def profiles_from_releases(releases: Mapping[str, Mapping[str, float]]) -> list[DadProfile]:
    """Server side: one profile per site's noised release, plus the consortium's (the releases' sums
    added up). Only released (noised) values enter: post-processing, no further privacy cost."""
    out = [profile_of(r, name, "federated release") for name, r in sorted(releases.items())]
    if len(releases) > 1:
        pooled = {k: sum(float(r[k]) for r in releases.values()) for k in SUMS}
        out.append(profile_of(pooled, "consortium", "federated release (pooled)"))
    return out


def denormalise(image: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Instance-normalise ``image`` with its own statistics, de-normalise with (mean, std), clip to [0, 1]."""
    own_std = image.std()
    if float(own_std) < MIN_STD:
        return image
    return ((image - image.mean()) / own_std * std + mean).clamp(0.0, 1.0)


def target_profiles(task: TaskConfig, own_site: str | None) -> list[DadProfile]:
    """The profiles a site may re-style towards: those of ``task.dad_profiles`` from the mode's source
    (public ones for ``public``, noised releases for ``federated``), without the site's own release."""
    federated = task.augment_dad == "federated"
    return [p for p in task.dad_profiles if p.source.startswith("federated") == federated and p.name != own_site]


class DomainDenormalised(RandomizableTransform, MapTransform):
    """Dictionary transform: with probability ``prob`` re-style ``keys`` towards one of ``profiles``,
    drawn at random (``set_random_state`` seeds it with the rest of the training augmentation)."""

    def __init__(self, profiles: Sequence[DadProfile], prob: float, keys: str = "image") -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)
        self.profiles = list(profiles)

    def __call__(self, data: Mapping) -> dict:
        self.randomize(None)
        out = dict(data)
        if self._do_transform and self.profiles:
            target = self.profiles[int(self.R.randint(len(self.profiles)))]
            for key in self.key_iterator(out):
                out[key] = denormalise(out[key], target.mean, target.std)
        return out


def dad_transform(task: TaskConfig, own_site: str | None, seed: int) -> DomainDenormalised | None:
    """The DAD step of a site's training augmentation, or None (``task.augment_dad=none``).

    ``public`` without profiles is a config error (shared.config). ``federated`` profiles exist only
    in the job config a federated run sends (server.dad fills them before round 1); a loader outside
    such a run (researcher-side evaluation, `fedmsk central`) has none, is told so, and goes on
    without DAD.
    """
    if task.augment_dad == "none":
        return None
    profiles = target_profiles(task, own_site)
    if not profiles:
        log.warning("task.augment_dad=%s but no domain profile other than %s's own: this data is loaded without DAD "
                    "(federated profiles come from the sites' releases in a federated run)", task.augment_dad, own_site)
        return None
    transform = DomainDenormalised(profiles, task.dad_prob)
    transform.set_random_state(seed=seed)
    return transform
