"""The hospital's ClientApp for secure aggregation (SecAgg+), on the same training code.

Flower 1.41 has SecAgg+ only in the legacy workflow: the client side is a legacy
``ClientApp(client_fn=..., mods=[secaggplus_mod])`` around a ``NumPyClient``; the mod masks the
site's weighted update before it leaves, so the server only ever sees masked integers and
their sum. ``SiteNumPyClient`` is a thin adapter: ``fit`` and ``evaluate`` call
``client.app.run_train`` / ``run_evaluate`` (the same code, the same site settings, the same
DP, the same metric whitelist as the Message-API app) and only convert between named state
dicts and the legacy unnamed array list.

``app`` routes per message: legacy and SecAgg+ messages go to the legacy app, everything else
to ``client.app.app``; so one FAB serves runs with and without secure aggregation.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client.app import app as message_app
from client.app import run_evaluate, run_train
from shared.config import FedmskConfig, from_yaml
from shared.model_cache import model_cache_mod
from shared.packing import packed_arrays_mod
from shared.messages import (
    EVAL_METRIC_KEYS, JOB_KEY, METRICS, NUM_EXAMPLES, RUN_ID_KEY, SPLIT_KEY, TRAIN_METRIC_KEYS, site_reply,
)

# Keys of legacy records (flwr.compat.common.recorddict_compat) that mark a legacy message.
_LEGACY_PREFIXES = ("fitins", "evaluateins", "getparametersins", "getpropertiesins")


@lru_cache(maxsize=4)
def _job(job_yaml: str) -> FedmskConfig:
    return from_yaml(job_yaml, origin="run config sent by the server")


@lru_cache(maxsize=4)
def parameter_names(job_yaml: str) -> tuple[str, ...]:
    """The model's state-dict keys in order: the legacy array list carries no names."""
    from client.trainer import build_screener

    return tuple(build_screener(_job(job_yaml)).state_dict())


def to_state(parameters: list[np.ndarray], job_yaml: str) -> dict[str, torch.Tensor]:
    names = parameter_names(job_yaml)
    if len(names) != len(parameters):
        raise ValueError(f"server sent {len(parameters)} arrays; this run's model has {len(names)} (different model config?)")
    return {k: torch.from_numpy(np.array(p, copy=True)) for k, p in zip(names, parameters)}


def train_size(node_config: dict[str, Any], job_yaml: str) -> int:
    """Training patients at this site (SecAgg+ scales each update by it; the server sets max_weight from it)."""
    from client.site import resolve_site
    from shared.sitedata import load_site, make_datasets

    cfg = _job(job_yaml)
    site = resolve_site(node_config, cfg)
    return len(make_datasets(load_site(site.data_dir, cfg.task), cfg.task, cfg.seed)["train"])


class SiteNumPyClient(NumPyClient):
    """Legacy adapter around run_train / run_evaluate (see the module docstring)."""

    def __init__(self, node_config: dict[str, Any]) -> None:
        self.node_config = node_config

    def get_properties(self, config: dict[str, Any]) -> dict[str, Any]:
        return {NUM_EXAMPLES: train_size(self.node_config, str(config[JOB_KEY]))}

    def fit(self, parameters, config):  # type: ignore[no-untyped-def]
        job = str(config[JOB_KEY])
        weights = to_state(parameters, job)
        run_id = str(config.get(RUN_ID_KEY, ""))  # the privacy ledger books the spend per run
        site, state, metrics = run_train(self.node_config, job, weights, int(config["server-round"]), run_id)
        # the same whitelist as the Message-API reply; raises on anything else
        checked = dict(site_reply(site_name=site.name, metrics=metrics, allowed=TRAIN_METRIC_KEYS,
                                  state=state, expected_keys=set(weights))[METRICS])
        return [state[k].numpy() for k in parameter_names(job)], int(checked[NUM_EXAMPLES]), checked

    def evaluate(self, parameters, config):  # type: ignore[no-untyped-def]
        job = str(config[JOB_KEY])
        site, metrics = run_evaluate(self.node_config, job, to_state(parameters, job), str(config.get(SPLIT_KEY, "val")),
                                     int(config.get("server-round", 0)), str(config.get(RUN_ID_KEY, "")))
        checked = dict(site_reply(site_name=site.name, metrics=metrics, allowed=EVAL_METRIC_KEYS)[METRICS])
        return float(checked.get("loss", float("nan"))), int(checked[NUM_EXAMPLES]), checked


def _client_fn(context: Context):  # type: ignore[no-untyped-def]
    return SiteNumPyClient(dict(context.node_config)).to_client()


legacy_app = ClientApp(client_fn=_client_fn, mods=[secaggplus_mod])


def is_legacy_message(message: Message) -> bool:
    """True for SecAgg+ stage messages and legacy fit/evaluate/properties messages."""
    if message.has_error():
        return False
    keys = set(message.content.keys())
    return RECORD_KEY_CONFIGS in keys or any(k.startswith(_LEGACY_PREFIXES) for k in keys)


class RoutingClientApp(ClientApp):
    """One ClientApp for both workflows: legacy messages to ``legacy_app``, others to the Message-API app."""

    def __init__(self) -> None:
        super().__init__()

    def __call__(self, message: Message, context: Context) -> Message:
        # unpacked, then the global model put back where the server left it out (shared.model_cache), then routed
        return packed_arrays_mod(message, context, lambda m, c: model_cache_mod(m, c, self._route))

    @staticmethod
    def _route(message: Message, context: Context) -> Message:
        target = legacy_app if is_legacy_message(message) else message_app
        return target(message, context)


app = RoutingClientApp()
