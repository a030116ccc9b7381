"""Example-weighted averaging that folds each update in as it arrives (simulation at hundreds of sites).

Flower's FedAvg aggregates a list of replies, so the coordinator holds every site's update at
once: at 200 simulated sites that is 200 models in the driver (MM-CL: 136 MB, most of what grew
between 10 and 200 sites in bench/bench_scale.py). For the strategies whose aggregate is the
plain example-weighted mean (FedAvg, FedBN, FedProx; FedAdam/FedYogi apply their optimiser to
that mean), ``RunningMean`` keeps one running sum instead, and the strategy then aggregates a
single reply holding the mean and the example-weighted mean of the train metrics, which is the
same arithmetic (weights ``n_i / sum n``) with one model in memory whatever the number of sites.
Strategies that need every update side by side (Krum, the median, the trimmed mean, client-level
DP's per-update clipping) keep Flower's list.

``replies_as_they_come`` is the in-memory grid's own push/pull loop (Flower's
``InMemoryGrid.send_and_receive``) yielding each reply when it is pulled, so a reply can be
checked, recorded and folded before the next arrives. Any other grid (deployment, where a
round's sites are dozens of hospitals, not hundreds) answers as before, all at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi, Strategy

from shared.messages import ARRAYS, METRICS, NUM_EXAMPLES

STREAMED = (FedAvg, FedProx, FedAdam, FedYogi)  # exact classes: FedMedian, Krum, ... subclass FedAvg


def streams(strategy: Strategy) -> bool:
    """Whether ``strategy``'s aggregate is the example-weighted mean of the updates (see the module docstring)."""
    return type(strategy) in STREAMED and strategy.weighted_by_key == NUM_EXAMPLES


def replies_as_they_come(grid: Grid, messages: Iterable[Message], timeout: float | None) -> Iterator[Message]:
    """Each reply as soon as the grid has it (simulation's in-memory grid), else all after ``send_and_receive``."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    if not isinstance(grid, InMemoryGrid) or "send_and_receive" in vars(grid):  # a wrapped grid keeps its own loop
        yield from grid.send_and_receive(messages, timeout=timeout)
        return
    pending = set(grid.push_messages(messages))
    end = time.time() + (timeout or 0.0)
    while pending and (timeout is None or time.time() < end):
        got = list(grid.pull_messages(pending))
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        yield from got
        if pending:
            time.sleep(grid.pull_interval)


class RunningMean:
    """Running example-weighted sums of the accepted updates' arrays and train metrics."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self.metrics: dict[str, float] = {}
        self.weight = 0.0
        self.first: Message | None = None

    def add(self, reply: Message) -> None:
        """Fold ``reply`` in and drop its arrays (its metrics stay on it)."""
        content = reply.content
        metrics = dict(content[METRICS])
        w = float(metrics[NUM_EXAMPLES])
        if self.first is None:
            self.first = reply
        elif set(metrics) != set(self.metrics) | {NUM_EXAMPLES} or set(content[ARRAYS]) != set(self.arrays):
            raise InconsistentMessageReplies(reason="a site's reply holds other array or metric keys than the first one's")
        for key, arr in content[ARRAYS].items():
            value = arr.numpy()
            if key not in self.arrays:
                self.dtypes[key] = (np.zeros((), value.dtype) * 1.0).dtype  # what Flower's weighted sum yields
                self.arrays[key] = np.zeros(value.shape, np.float64)
            self.arrays[key] += value * w
        for key, value in metrics.items():
            if key != NUM_EXAMPLES:
                self.metrics[key] = self.metrics.get(key, 0.0) + float(value) * w
        self.weight += w
        reply.content = RecordDict({k: v for k, v in content.items() if k != ARRAYS})

    def as_reply(self) -> Message:
        """One reply holding the mean and the mean metrics, weighted by the total examples (for the strategy)."""
        if self.first is None or self.weight <= 0:
            raise InconsistentMessageReplies(reason="the accepted updates weigh 0 examples in all")
        arrays = ArrayRecord({k: Array(np.asarray(v / self.weight, dtype=self.dtypes[k])) for k, v in self.arrays.items()})
        metrics = MetricRecord({k: v / self.weight for k, v in self.metrics.items()} | {NUM_EXAMPLES: self.weight})
        self.first.content = RecordDict({ARRAYS: arrays, METRICS: metrics})
        return self.first
