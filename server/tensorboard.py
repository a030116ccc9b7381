"""TensorBoard event files for a run, written as the rounds go.

``tensorboard --logdir runs/`` then shows every run's federation live: one TensorBoard "run"
per site plus ``global`` (``<run>/tensorboard/<site>/``), tags ``train/<metric>``,
``val/<metric>`` and ``test/<metric>``, step = round. The rows are the ones the run folder's
``metrics.jsonl`` holds (what the sites sent and the server pooled), so the two never disagree.
TensorBoard's own record writer and protobufs write the files (RunBoard; the ``tensorboard``
package is pinned in pyproject.toml and also provides the viewer).
"""

from __future__ import annotations

import math
import re
import socket
import time
from pathlib import Path
from typing import Any

from tensorboard.compat.proto import event_pb2
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard.summary import scalar

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
    """Appends the recorder's rows to one event file per site; each round's file is closed once written.

    PyTorch's ``SummaryWriter`` keeps a thread, a queue and an open file per site and cannot add
    to an existing event file: at 200 simulated sites the writers were 16 MB of the coordinator,
    and reopening them each round makes a new file per round whose names TensorBoard may read
    out of order (same second). Here each site's file (``events.out.tfevents.<start>.<host>.fedmsk``,
    TFRecord written by TensorBoard's own ``RecordWriter``) is opened for appending,
    written and closed every round, so nothing stays open between rounds whatever the number of
    sites, and a file read while the run goes on always ends on a whole round.
    """

    def __init__(self, run_dir: Path) -> None:
        self.root = run_dir / TB_DIRNAME
        self.name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.fedmsk"

    def _path(self, site: str) -> Path:
        return self.root / re.sub(r"[^A-Za-z0-9_.-]", "_", site) / self.name

    def write(self, rows: list[dict[str, Any]]) -> int:
        """Append these (new) rows to their sites' files; returns how many scalars were written."""
        by_site: dict[str, list[event_pb2.Event]] = {}
        for row in rows:
            events = by_site.setdefault(str(row["site"]), [])
            for tag, value in scalar_tags(row).items():
                events.append(event_pb2.Event(wall_time=row.get("time") or time.time(), step=int(row["round"]),
                                              summary=scalar(tag, value)))
        for site, events in by_site.items():
            path = self._path(site)
            new = not path.is_file()
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("ab") as fh:
                out = RecordWriter(fh)
                if new:  # what TensorBoard expects first in an event file
                    out.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
                for event in events:
                    out.write(event.SerializeToString())
        return sum(len(e) for e in by_site.values())

    def close(self) -> None:
        """Nothing stays open between writes."""
