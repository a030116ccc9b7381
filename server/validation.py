"""Checks on every site update before it is aggregated.

A reply whose arrays do not match the global model (missing or extra names, other shapes),
hold NaN/Inf, or move the model implausibly far is left out of the round with a log line
naming the site; the round goes on with the others. Flower's strategies check only that
replies are consistent with each other, not with the model, so this lives here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord

from shared.messages import ARRAYS


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""
    update_norm: float = 0.0


def check_update(global_arrays: ArrayRecord, content, max_update_norm: float) -> Verdict:
    """Is ``content`` (a train reply's RecordDict) a sane update of ``global_arrays``?"""
    if ARRAYS not in content.array_records:
        return Verdict(False, "reply carries no model arrays")
    update = content[ARRAYS]
    missing = set(global_arrays) - set(update)
    extra = set(update) - set(global_arrays)
    if missing or extra:
        return Verdict(False, f"array names differ from the model (missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]})")
    sq = 0.0
    for key, ref in global_arrays.items():
        new = update[key].numpy()
        old = ref.numpy()
        if new.shape != old.shape:
            return Verdict(False, f"array '{key}' has shape {new.shape}, model has {old.shape}")
        if new.dtype.kind == "f":
            if not np.isfinite(new).all():
                return Verdict(False, f"array '{key}' holds NaN or Inf")
            sq += float(np.sum((new.astype(np.float64) - old.astype(np.float64)) ** 2))
    norm = sq**0.5
    if norm > max_update_norm:
        return Verdict(False, f"update norm {norm:.3g} exceeds the limit {max_update_norm:.3g}", norm)
    return Verdict(True, update_norm=norm)


class RejectionTracker:
    """Counts each site's rejected updates in a row; after ``limit`` of them the site is excluded.

    A site whose every update fails the checks is either broken or hostile; asking it again each
    round costs a round trip and fills the log. ``limit`` 0 never excludes. Keyed by Flower node id.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.streak: dict[int, int] = {}
        self.excluded: set[int] = set()

    def record(self, node: int, ok: bool) -> bool:
        """Note one verdict; True when this rejection is the one that excludes the site."""
        self.streak[node] = 0 if ok else self.streak.get(node, 0) + 1
        if not ok and self.limit and self.streak[node] >= self.limit and node not in self.excluded:
            self.excluded.add(node)
            return True
        return False

    def allowed(self, messages):
        """The messages not addressed to an excluded site."""
        return [m for m in messages if m.metadata.dst_node_id not in self.excluded]
