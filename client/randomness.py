"""Site-secret randomness: what DP-SGD's guarantee assumes nobody outside the site can predict.

Poisson sampling decides which patients are in each step and the Gaussian noise hides each
patient's clipped gradient; both are secret to the site in the accounting. A generator seeded
from anything the server knows (the run's ``seed``, the round number) or left at torch's
fixed default seed lets the server replay every batch and subtract the noise. So every
training-time generator at a site is seeded from the operating system's entropy pool
(``secrets``), per call.

Opacus' own ``secure_mode`` would draw from torchcsprng's /dev/urandom generator; torchcsprng's
last release (0.2.1, 2021) has no wheel for Python 3.11 / torch 2.x and does not install here,
so fedmsk seeds torch's ordinary generators (Mersenne Twister on CPU, Philox on CUDA) from OS
entropy instead: unpredictable to the server, but not a cryptographic generator (see the
README, "Secure randomness").

Tests and benchmarks may need repeatable runs: the environment variable ``FEDMSK_INSECURE_DP_SEED``,
set at the site itself (never sent by the server), derives every seed from its value and a
purpose label instead. It voids the guarantee against anyone who knows the value, and it is
logged as a warning every time it is used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets

import torch

log = logging.getLogger("fedmsk.privacy")

INSECURE_SEED_ENV = "FEDMSK_INSECURE_DP_SEED"


def site_seed(*purpose: object) -> int:
    """A 63-bit seed from OS entropy; with ``FEDMSK_INSECURE_DP_SEED`` set, a hash of it and ``purpose``."""
    fixed = os.environ.get(INSECURE_SEED_ENV)
    if not fixed:
        return secrets.randbits(63)
    log.warning("%s is set: training randomness (%s) is reproducible and NOT secret; tests only", INSECURE_SEED_ENV, purpose)
    digest = hashlib.sha256(repr((fixed, *purpose)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def site_generator(*purpose: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded by ``site_seed(*purpose)``."""
    return torch.Generator(device=device).manual_seed(site_seed(*purpose))
