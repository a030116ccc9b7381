"""The site's side of federated domain-adaptive denormalisation: answer the server's "query.dad_profile".

Before round 1 of a run with ``task.augment_dad=federated`` the server asks every site once for its
intensity statistics (server.dad). The site answers with ``client.release.release_intensity``: the
bounded sums of its training images (labelled or not; never val/test), DP-noised under its own policy
and booked in its ledger, or an error reply once its release budget is spent. Only the three noised
sums leave the site (the reply whitelist is exactly them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Context, Message

from client.app import _job, app
from client.ledger import PrivacyLedger
from client.privacy import resolve_policy
from client.release import release_intensity
from client.site import resolve_site
from shared.dad import SUMS
from shared.messages import CONFIG, JOB_KEY, RUN_ID_KEY, site_reply

QUERY = "dad_profile"  # message type "query.dad_profile"


def training_images(data_dir: str, cfg) -> np.ndarray:
    """The images of the patients the site trains or pretrains on: every usable patient but val and test."""
    from shared.sitedata import load_site, site_splits

    site = load_site(data_dir, cfg.task, labelled_only=False)
    split = site_splits(site, cfg.task, cfg.seed)
    return site.images[np.sort(np.concatenate([split["train_all"], split["unlabelled"]]))]


def run_release(node_config: dict[str, Any], job_yaml: str, run_id: str) -> tuple[str, dict[str, float]]:
    """(site name, noised intensity sums) of this site; ReleaseRefused past its release budget."""
    cfg = _job(job_yaml)
    site = resolve_site(node_config, cfg)
    policy = resolve_policy(node_config, cfg.privacy, site.data_dir)  # the site's own policy wins
    images = training_images(str(site.data_dir), cfg)
    return site.name, release_intensity(images, policy, PrivacyLedger.load(site.data_dir), run_id=run_id or "run")


@app.query(QUERY)
def dad_profile(msg: Message, context: Context) -> Message:
    config = msg.content[CONFIG]
    name, sums = run_release(dict(context.node_config), str(config[JOB_KEY]), str(config.get(RUN_ID_KEY, "")))
    return Message(content=site_reply(site_name=name, metrics=sums, allowed=frozenset(SUMS)), reply_to=msg)
