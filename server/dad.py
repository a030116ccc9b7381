"""The server's side of federated domain-adaptive denormalisation: gather the sites' noised
intensity releases once per run and put the profiles built from them into the job config.

Every site answers "query.dad_profile" (client.dad) with DP-noised bounded sums, or an error once
its release budget is spent; the profiles (one per releasing site, plus their pooled mean,
shared.dad.profiles_from_releases) are post-processing of those releases. They are written to
``<run_dir>/dad_profiles.json`` so a resumed run uses the same profiles instead of asking again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from shared.config import DadProfile, FedmskConfig, to_yaml
from shared.messages import CONFIG, JOB_KEY, METRICS, RUN_ID_KEY, reply_site_name

log = logging.getLogger("fedmsk.server")
PROFILES_FILE = "dad_profiles.json"


def gather_profiles(grid: Grid, cfg: FedmskConfig, run_dir: Path, on_progress=None) -> FedmskConfig:
    """``cfg`` with ``task.dad_profiles`` from the sites' noised releases (or the run folder's, on resume).

    A site that refuses (budget spent) or fails is named and left out; no release at all stops the
    run before round 1 (RuntimeError), since the config asked for federated profiles.
    """
    from shared.dad import SUMS, profiles_from_releases

    saved = run_dir / PROFILES_FILE
    if saved.is_file():
        profiles = [DadProfile(**p) for p in json.loads(saved.read_text())]
    else:
        content = RecordDict({CONFIG: ConfigRecord({JOB_KEY: to_yaml(cfg), RUN_ID_KEY: run_dir.name})})
        messages = [Message(RecordDict(dict(content)), dst_node_id=node, message_type="query.dad_profile")
                    for node in grid.get_node_ids()]
        releases, refused = {}, {}
        for reply in grid.send_and_receive(messages, timeout=cfg.strategy.round_timeout_s):
            name = reply_site_name(reply.content, f"node-{reply.metadata.src_node_id}") if not reply.has_error() else \
                f"node-{reply.metadata.src_node_id}"
            if reply.has_error():
                refused[name] = reply.error.reason
                continue
            metrics = reply.content[METRICS]
            releases[name] = {k: float(metrics[k]) for k in SUMS}
        for name, why in refused.items():
            log.warning("augment_dad=federated: %s released no intensity statistics: %s", name, why)
        if not releases:
            raise RuntimeError(f"task.augment_dad=federated: no site released its intensity statistics "
                               f"({'; '.join(f'{k}: {v}' for k, v in refused.items()) or 'no site answered'}); "
                               f"use augment_dad=public or none")
        profiles = profiles_from_releases(releases)
        run_dir.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps([asdict(p) for p in profiles], indent=1))
    if on_progress:
        on_progress(f"domain profiles from {len(profiles)} noised releases: "
                    + ", ".join(f"{p.name} {p.mean:.2f}/{p.std:.2f}" for p in profiles))
    return replace(cfg, task=replace(cfg.task, dad_profiles=profiles))
