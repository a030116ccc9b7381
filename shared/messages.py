"""What travels between the server and a site, in one place both sides import.

The privacy rule "only weights and whitelisted scalar metrics leave a site" is enforced
here: a site builds its reply with ``site_reply`` which refuses any metric key outside the
whitelist and any array that is not a model parameter. Patient IDs, pixels, per-patient
scores or embeddings have no way into a reply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from shared.grading import COUNT_PREFIXES as GRADING_COUNT_PREFIXES, grading_metric_keys

from shared.metrics import HIST_KEYS

# Keys of the server's ConfigRecord (besides Flower's own "server-round").
JOB_KEY = "fedmsk-job"  # YAML of the run config the site trains with (site settings still win)
RUN_ID_KEY = "run-id"
SPLIT_KEY = "split"  # evaluate: which split of the site's data (val | test)

ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
SITE = "site"  # reply ConfigRecord holding only the site's name

NUM_EXAMPLES = "num-examples"
TRAIN_METRIC_KEYS = frozenset({NUM_EXAMPLES, "train_loss", "train_acc", "steps", "dp", "epsilon", "delta",
                               "epsilon_run"})  # epsilon_run: a pretraining run's own spend (client.pretrain.run_spend)
CONFUSION_KEYS = ("tp", "fp", "tn", "fn")
COUNT_KEY_PREFIXES = ("hist",)  # score-histogram bins: counts of patients, noised like the confusion counts


COUNT_KEY_PREFIXES += GRADING_COUNT_PREFIXES  # grade tasks: confusion cells, screening counts


def is_count_key(key: str) -> bool:
    """A metric that counts patients (what a site's release noise must cover: client.release)."""
    return key in CONFUSION_KEYS or key.startswith(COUNT_KEY_PREFIXES)


EVAL_METRIC_KEYS = frozenset(
    {NUM_EXAMPLES, "loss", "auc", "acc", "f1", "sen", "spc", "pre", "tp", "fp", "tn", "fn", *HIST_KEYS}
)  # HIST_KEYS: per-class score-histogram counts (binary tasks), for the pooled ROC at the server


EVAL_METRIC_KEYS |= grading_metric_keys()  # grade tasks (shared.grading)


class ReplyRefused(ValueError):
    """A site tried to send something that is not a weight or a whitelisted scalar."""


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return record.to_torch_state_dict()


def site_reply(
    *,
    site_name: str,
    metrics: Mapping[str, float],
    allowed: frozenset[str],
    state: Mapping[str, torch.Tensor] | None = None,
    expected_keys: set[str] | None = None,
) -> RecordDict:
    """Build a site's reply, refusing anything outside the whitelist.

    ``expected_keys`` are the model's parameter/buffer names; an array under any other name
    (an embedding, an image) is refused. Metrics must be finite scalars or NaN (undefined,
    e.g. AUC on a one-class split).
    """
    extra = set(metrics) - allowed
    if extra:
        raise ReplyRefused(f"metric keys {sorted(extra)} are not whitelisted to leave the site")
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, (list, tuple, np.ndarray, torch.Tensor)) and np.ndim(value) > 0:
            raise ReplyRefused(f"metric '{key}' is not a scalar; only scalars leave a site")
        fv = float(value)
        if math.isinf(fv):
            raise ReplyRefused(f"metric '{key}' is infinite")
        clean[key] = fv
    content = RecordDict({METRICS: MetricRecord(clean), SITE: ConfigRecord({"name": site_name})})
    if state is not None:
        if expected_keys is not None and set(state) != expected_keys:
            raise ReplyRefused(
                f"arrays {sorted(set(state) ^ expected_keys)[:5]} are not the model's parameters"
            )
        content[ARRAYS] = state_to_record(state)
    return content


def reply_site_name(content: RecordDict, default: str) -> str:
    rec = content.config_records.get(SITE)
    return str(rec["name"]) if rec is not None and "name" in rec else default
