"""What a strategy choice adds to the coordinator's round loop (server/federation.py).

The loop itself stays about messages, validation and the run folder; the pieces a config
switches on live here, each a method the loop calls at one point:

* ``outgoing`` / ``incoming``: with ``strategy.local_params`` (FedBN and the like) only the
  shared parameters are sent and aggregated; the server keeps the full model (its copy of the
  site-local parameters is the initial one) and merges the aggregate back into it.
* ``select`` / ``verdict``: a site rejected ``strategy.exclude_after_rejections`` rounds in a
  row gets no further message in this run (server.validation.RejectionTracker), also after a
  resume: the excluded node ids are kept in ``checkpoints/excluded.json`` (a deployment's
  SuperLink with ``--database`` keeps node ids across restarts; a new simulation draws new ones).
* ``checkpoint`` / ``resume``: the server optimiser state of FedAdam/FedYogi beside each
  round's checkpoint (server.strategy_state).
* ``round_done`` / ``close``: TensorBoard scalars of the round (server.tensorboard).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import Strategy

from server.report import RunRecorder
from shared.atomic import atomic_write_text
from server.strategy_state import load_strategy_state, save_strategy_state
from server.tensorboard import RunBoard
from server.validation import RejectionTracker
from shared.config import FedmskConfig


class RunHooks:
    def __init__(self, cfg: FedmskConfig, run_dir: Path, strategy: Strategy, recorder: RunRecorder) -> None:
        self.cfg, self.run_dir, self.strategy, self.recorder = cfg, run_dir, strategy, recorder
        self.local: frozenset[str] = frozenset()
        if cfg.strategy.local_params:
            from client.local_state import local_keys
            from client.trainer import build_screener

            self.local = local_keys(build_screener(cfg), cfg.strategy.local_params)
        self.rejections = RejectionTracker(cfg.strategy.exclude_after_rejections)
        self.excluded_path = run_dir / "checkpoints" / "excluded.json"
        self.board = RunBoard(run_dir)
        self._board_offset = recorder.end_offset()  # a resumed run does not write its old rows twice

    def outgoing(self, arrays: ArrayRecord) -> ArrayRecord:
        """The part of the global model that travels."""
        if not self.local:
            return arrays
        return ArrayRecord({k: v for k, v in arrays.items() if k not in self.local})

    def incoming(self, arrays: ArrayRecord, aggregated: ArrayRecord | None) -> ArrayRecord:
        """The new full global model: ``arrays`` with the aggregated shared parameters."""
        if aggregated is None:
            return arrays
        if not self.local:
            return aggregated
        return ArrayRecord({k: (aggregated[k] if k in aggregated else v) for k, v in arrays.items()})

    def select(self, messages: Iterable[Message]) -> list[Message]:
        return self.rejections.allowed(list(messages))

    def verdict(self, node: int, ok: bool) -> str | None:
        """Record a validation verdict; the exclusion notice when this one excludes the site."""
        if not self.rejections.record(node, ok):
            return None
        n = self.rejections.limit
        atomic_write_text(self.excluded_path, json.dumps(sorted(self.rejections.excluded)))
        return (f"update rejected {n} rounds in a row (strategy.exclude_after_rejections={n}); "
                f"the site gets no further round of this run")

    def checkpoint(self, rnd: int) -> None:
        save_strategy_state(self.run_dir, rnd, self.strategy)

    def resume(self, rnd: int) -> None:
        load_strategy_state(self.run_dir, rnd, self.strategy)
        if self.excluded_path.is_file():
            self.rejections.excluded |= {int(n) for n in json.loads(self.excluded_path.read_text())}

    def _board_rows(self) -> None:
        rows, self._board_offset = self.recorder.read_rows(self._board_offset)
        self.board.write(rows)

    def round_done(self) -> None:
        self._board_rows()

    def close(self) -> None:
        self._board_rows()
        self.board.close()
