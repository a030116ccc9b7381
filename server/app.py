"""The coordinator's Flower ServerApp (Message API).

In deployment (`flwr run`, `fedmsk launch`) the Hydra overrides arrive in the run config key
``overrides``; in simulation the runner builds the app with an already composed config.
Both call the same ``run_federation``.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import RunStopped, run_federation
from server.reply_poll import quick_replies
from shared.config import FedmskConfig, compose
from shared.model_cache import deliver_once


def default_run_dir(cfg: FedmskConfig, verb: str) -> Path:
    return Path(cfg.run_dir) if cfg.run_dir else Path("runs") / f"{verb}-{time.strftime('%Y%m%d-%H%M%S')}"


def make_server_app(cfg: FedmskConfig | None = None, run_dir: Path | None = None, on_progress=None, on_finish=None) -> ServerApp:
    """A ServerApp for ``cfg`` (simulation) or for the run config's overrides (deployment)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg or compose(shlex.split(str(context.run_config.get("overrides", ""))))
        folder = run_dir or default_run_dir(run_cfg, "federation")
        grid = quick_replies(grid, run_cfg.federation.reply_poll_s, pack=not run_cfg.federation.secure_aggregation)
        grid = deliver_once(grid)  # the global model goes down once a round, not in evaluate and again in train
        if run_cfg.federation.secure_aggregation:
            from server.secagg import run_secure_federation

            run_secure_federation(grid, context, run_cfg, folder, run_cfg.federation.secagg_max_dropouts)
            return
        try:
            arrays, recorder = run_federation(grid, run_cfg, folder, on_progress)
        except RunStopped as stop:  # the summary says why; re-raised so the run ends failed, not completed
            stop.recorder.finish(stop.arrays, {"stopped": str(stop)})
            raise
        extra = on_finish(arrays, recorder) if on_finish else None
        recorder.finish(arrays, extra)
        if run_cfg.pretrain.objective != "none":  # a pretraining job keeps its encoders + card (`fedmsk pretrain`)
            from server.export import code_version
            from shared.provenance import CARD, write_pretrained

            write_pretrained(run_cfg, folder, arrays.to_torch_state_dict(), recorder.rows, code_version())
            warning = json.loads((folder / CARD).read_text())["feature_scale"].get("warning")
            if warning:  # the server log and events.jsonl say so; the weights are kept
                recorder.event(run_cfg.rounds, "global", "warning", warning)
                logging.getLogger(__name__).warning("pretrained encoder: %s", warning)

    return server_app


app = make_server_app()
