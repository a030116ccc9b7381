"""TensorBoard event files for a run, written as the rounds go.

``tensorboard --logdir runs/`` then shows every run's federation live: one TensorBoard "run"
per site plus ``global`` (``<run>/tensorboard/<site>/``), tags ``train/<metric>``,
``val/<metric>`` and ``test/<metric>``, step = round. The rows are the ones the run folder's
``metrics.jsonl`` holds (what the sites sent and the server pooled), so the two never disagree.
PyTorch's ``SummaryWriter`` writes the files (it needs the ``tensorboard`` package, pinned in
pyproject.toml, which also provides the viewer).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

NOT_SCALARS = {"round", "phase", "split", "site", "time"}
SKIP_PREFIXES = ("hist_",)  # score-histogram bins: 100 counts a row, read through the ROC of `fedmsk report`
TB_DIRNAME = "tensorboard"


def scalar_tags(row: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row as TensorBoard tag -> value (None/NaN left out)."""
    prefix = row["split"] or row["phase"]
    out = {}
    for key, value in row.items():
        if key in NOT_SCALARS or key.startswith(SKIP_PREFIXES) or isinstance(value, (str, bool)) or value is None \
                or math.isnan(float(value)):
            continue
        out[f"{prefix}/{key}"] = float(value)
    return out


class RunBoard:
    """Writes the recorder's rows to event files; ``flush`` after each round makes them visible."""

    def __init__(self, run_dir: Path, start: int = 0) -> None:
        self.root = run_dir / TB_DIRNAME
        self.writers: dict[str, SummaryWriter] = {}
        self.done = start  # rows already written (a resumed run does not write them twice)

    def _writer(self, site: str) -> SummaryWriter:
        if site not in self.writers:
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", site)
            self.writers[site] = SummaryWriter(log_dir=str(self.root / safe), flush_secs=5)
        return self.writers[site]

    def write(self, rows: list[dict[str, Any]]) -> int:
        """Write rows[self.done:]; returns how many scalars were written."""
        written = 0
        for row in rows[self.done:]:
            writer = self._writer(str(row["site"]))
            for tag, value in scalar_tags(row).items():
                writer.add_scalar(tag, value, global_step=int(row["round"]), walltime=row.get("time"))
                written += 1
        self.done = len(rows)
        for writer in self.writers.values():
            writer.flush()
        return written

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
