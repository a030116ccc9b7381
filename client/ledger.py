"""The site's privacy ledger: its DP accountant history on its own disk.

One JSON file per site, ``<site_dir>/.fedmsk/privacy_ledger.json``, holds every noisy step
the site has ever taken (the accountant history: noise multiplier, sample rate, steps), the
noise plan of each run, one entry per trained round, one entry per noised release of evaluation
counts (client.release), and the site's pinned policy. A fresh
process (a new round, a new run, a restarted SuperNode) reads it and continues the same
budget. Writes are atomic (temp file, fsync, ``os.replace``, fsync of the folder), so a
process killed mid-write leaves either the old or the new ledger, never a torn one.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LEDGER_DIR = ".fedmsk"
LEDGER_NAME = "privacy_ledger.json"
FORMAT = 1

Step = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps), as Opacus' accountants keep it


def ledger_path(site_dir: str | Path) -> Path:
    return Path(site_dir) / LEDGER_DIR / LEDGER_NAME


class LedgerError(RuntimeError):
    """The ledger file exists but cannot be trusted; the site must not train on a guess."""


def merge_history(history: list[Step] | list[list[Any]]) -> list[Step]:
    """Merge consecutive entries with the same (noise, rate), exactly as Opacus' accountants do.

    Keeping one canonical form means the epsilon the ledger reports and the one an Opacus
    accountant computes for the same steps are the same number.
    """
    out: list[Step] = []
    for sigma, q, n in history:
        if out and out[-1][0] == float(sigma) and out[-1][1] == float(q):
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + int(n))
        else:
            out.append((float(sigma), float(q), int(n)))
    return out


@dataclass
class RoundEntry:
    """One trained round: the steps it took and the epsilon after it."""

    run_id: str
    round: int
    steps: int
    noise_multiplier: float
    sample_rate: float
    epsilon_round: float  # increase of the site's total epsilon over this round
    epsilon_total: float  # the site's epsilon after this round, all runs together
    delta: float
    time: float = field(default_factory=time.time)


@dataclass
class RunPlan:
    """Noise calibrated once for a run's whole planned schedule (all local steps, all rounds)."""

    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    target_epsilon: float
    # what the run started from (shared.provenance.init_line): random init or public weights; the
    # private data of every step booked here are this site's training split
    init: str = "random init"
    # what the steps trained (shared.ssl.objective_label): "supervised", or a pretraining objective such as
    # "pretrain:ssl/simsiam"; epsilon spent per objective is read from the rounds of the runs with each
    objective: str = "supervised"


@dataclass
class ReleaseEntry:
    """One noised release of evaluation counts (client.release): which split, how, at what cost."""

    run_id: str
    round: int
    split: str
    mechanism: str  # laplace | gaussian
    noise_scale: float  # Laplace b or Gaussian sigma, in counts
    sensitivity: float  # one patient's effect on the counts: L1 (Laplace) or L2 (Gaussian)
    epsilon: float  # of this release
    epsilon_split_total: float  # of every release of this split so far, composed
    delta: float
    time: float = field(default_factory=time.time)


@dataclass
class PrivacyLedger:
    path: Path
    policy: dict[str, Any] = field(default_factory=dict)
    history: list[Step] = field(default_factory=list)
    plans: dict[str, RunPlan] = field(default_factory=dict)
    rounds: list[RoundEntry] = field(default_factory=list)
    releases: list[ReleaseEntry] = field(default_factory=list)

    @classmethod
    def load(cls, site_dir: str | Path) -> PrivacyLedger:
        """Read the site's ledger; an absent file is an empty ledger (a site that never trained)."""
        path = ledger_path(site_dir)
        if not path.exists():
            return cls(path=path)
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT:
                raise ValueError(f"format {raw.get('format')!r}, expected {FORMAT}")
            return cls(
                path=path,
                policy=dict(raw["policy"]),
                history=merge_history(raw["history"]),
                plans={k: RunPlan(**v) for k, v in raw["plans"].items()},
                rounds=[RoundEntry(**r) for r in raw["rounds"]],
                releases=[ReleaseEntry(**r) for r in raw.get("releases", [])],  # absent in ledgers before releases
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise LedgerError(
                f"privacy ledger {path} is unreadable ({type(exc).__name__}: {exc}); the site will not train "
                f"without knowing the budget it has spent. Restore the file from the site's backup."
            ) from None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "policy": self.policy,
            "history": [list(h) for h in self.history],
            "plans": {k: asdict(v) for k, v in self.plans.items()},
            "rounds": [asdict(r) for r in self.rounds],
            "releases": [asdict(r) for r in self.releases],
        }

    def save(self) -> None:
        """Atomic write: temp file in the same folder, fsync, os.replace, fsync the folder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps(self.to_json(), indent=1).encode()
        fd, tmp = tempfile.mkstemp(prefix=f".{LEDGER_NAME}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def steps_taken(self) -> int:
        return sum(n for _, _, n in self.history)

    def release_totals(self) -> dict[str, dict[str, Any]]:
        """Epsilon spent on each evaluation split's released counts, from the entries client.release booked.

        The val and test patients are disjoint from the training patients (and from each other), so
        their spend is not part of DP-SGD's epsilon and is reported per split. An entry's
        ``epsilon_split_total`` is the composed cost of every release of its split so far, whatever
        the mechanism (client.release: Laplace added, Gaussian under RDP, the two added), so the
        newest entry's total is the split's spend.
        """
        out: dict[str, dict[str, Any]] = {}
        for r in self.releases:
            split = out.setdefault(r.split, {"releases": 0, "by_mechanism": {}, "delta": 0.0})
            split["releases"] += 1
            split["by_mechanism"][r.mechanism] = split["by_mechanism"].get(r.mechanism, 0) + 1
            split["epsilon"] = r.epsilon_split_total
            if r.mechanism == "gaussian":  # Laplace releases are pure epsilon-DP
                split["delta"] = max(split["delta"], r.delta)
        return out
