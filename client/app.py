"""The hospital's Flower ClientApp (Message API).

``run_train`` / ``run_evaluate`` hold the site's work and take plain Python values, so the
Message-API app below and the legacy SecAgg+ client call the same code. Each call reads the
run config the server sent, lets the site's own settings win (client.site), loads the site's
data once per process, trains or evaluates, and replies with weights and whitelisted scalar
metrics only (shared.messages).
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.ledger import PrivacyLedger
from client.privacy import SitePrivacy, dp_training, resolve_policy
from client.pretrain import attach_bank, evaluate_pretrain, pretrain_datasets, pretrain_training, run_spend
from client.release import release_counts
from client.local_state import site_local_params
from client.site import SiteIdentity, resolve_site
from client.site_cache import ByteBoundedCache
from client.trainer import build_screener, evaluate, make_loader, train_local
from shared.compression import COMPRESSION, encode_update
from shared.config import FedmskConfig, from_yaml
from shared.packing import packed_arrays_mod
from shared.provenance import init_line
from shared.ssl import check_pretrain_dp, objective_label
from shared.messages import (
    ARRAYS,
    CONFIG,
    EVAL_METRIC_KEYS,
    JOB_KEY,
    RUN_ID_KEY,
    SPLIT_KEY,
    TRAIN_METRIC_KEYS,
    record_to_state,
    site_reply,
)

log = logging.getLogger("fedmsk.client")
EVAL_SPLITS = ("val", "test")  # a site never releases metrics of its training patients
app = ClientApp(mods=[packed_arrays_mod])  # deployment: one array per message on the wire (shared.packing)


@lru_cache(maxsize=4)
def _job(job_yaml: str) -> FedmskConfig:
    return from_yaml(job_yaml, origin="run config sent by the server")


SITE_CACHE = ByteBoundedCache(8 << 20)  # resized to each job's federation.site_cache_mb


def _site_datasets(data_dir: str, task_yaml: str, seed: int, private: bool):
    """The site's decoded splits, kept per process between messages within ``federation.site_cache_mb``.

    In simulation one Ray worker plays many sites in turn (200 sites on 2 workers: 100 each); a
    bound in bytes, not sites, keeps its memory flat as the federation grows (client.site_cache).
    """
    SITE_CACHE.resize(int(_job(task_yaml).federation.site_cache_mb * 2**20))
    return SITE_CACHE.get((data_dir, task_yaml, seed, private), lambda: _load_datasets(data_dir, task_yaml, seed, private))


def _load_datasets(data_dir: str, task_yaml: str, seed: int, private: bool):
    """Decode and split the site's data (from its on-disk decode cache after the first time).

    ``private``: the site trains under DP, so the clinical scaling comes from the task's
    reference values, not from its training patients (shared.sitedata.make_datasets).
    """
    from shared.sitedata import load_site, make_datasets

    cfg = _job(task_yaml)
    if cfg.pretrain.objective != "none":  # a pretraining job: every patient but val/test, labelled or not
        return pretrain_datasets(data_dir, cfg, seed, private)
    site = load_site(data_dir, cfg.task)
    if site.issues:
        log.info("site %s: %d records left out (run `fedmsk check` for the list)", data_dir, len(site.issues))
    datasets = make_datasets(site, cfg.task, seed, private=private)
    if len(datasets["train"]) == 0:
        raise RuntimeError(
            f"site data {data_dir}: no usable labelled patient ({len(site.issues)} records left out); "
            f"run `fedmsk check {data_dir}` to see why"
        )
    return datasets


def _prepare(node_config: dict[str, Any], job_yaml: str, weights: dict[str, torch.Tensor], run_id: str = ""):
    cfg = _job(job_yaml)
    site = resolve_site(node_config, cfg)
    policy = resolve_policy(node_config, cfg.privacy, site.data_dir)  # the site's own budget wins
    check_pretrain_dp(cfg, policy.enabled)  # a site whose own policy turns DP on refuses an in-batch objective
    torch.set_num_threads(max(1, cfg.federation.torch_threads))
    datasets = _site_datasets(str(site.data_dir), job_yaml, cfg.seed, policy.enabled)
    screener = build_screener(cfg)
    attach_bank(screener, datasets)  # pretrain.ssl_loss=public: the public images its negatives embed
    local = site_local_params(cfg, site.data_dir, run_id, screener)  # FedBN-style: this site's own part
    screener.load_state_dict(local.fill(weights, screener.state_dict()) if local else weights)
    return cfg, site, policy, datasets, screener


def run_train(
    node_config: dict[str, Any], job_yaml: str, weights: dict[str, torch.Tensor], server_round: int, run_id: str = "",
    proximal_mu: float = 0.0,
) -> tuple[SiteIdentity, dict[str, torch.Tensor], dict[str, float]]:
    """One round of local training at this site: returns (site, new weights, metrics)."""
    cfg, site, policy, datasets, screener = _prepare(node_config, job_yaml, weights, run_id)
    privacy = None
    fed = dp_training(cfg.federation, policy) if policy.enabled else cfg.federation
    fed = pretrain_training(fed, cfg, node_config, policy.enabled)  # a DP pretraining job's own batch and lr
    if policy.enabled:
        privacy = SitePrivacy.open(site.data_dir, policy)
        # raises BudgetSpent (-> an error reply the server logs) before any step is taken
        privacy.begin_round(
            run_id or "run",
            server_round,
            planned_rounds=cfg.rounds,
            local_epochs=fed.local_epochs,
            n_train=len(datasets["train"]),
            batch_size=fed.batch_size,
            init=init_line(cfg.model.pretrained_path, cfg.model.finetune),
            objective=objective_label(cfg),
            run_epsilon=cfg.pretrain.epsilon if cfg.pretrain.objective != "none" else None,
        )
    # site-secret order: never derived from the seed or round the server sent (client.randomness)
    loader = make_loader(datasets["train"], fed.batch_size, shuffle=True, seed=None)
    result = train_local(screener, loader, fed, site.device, privacy=privacy, proximal_mu=proximal_mu)
    # the same keys with and without DP (Flower aborts a run whose sites reply with different keys);
    # under DP the loss/accuracy of the private batches are not covered by the guarantee: NaN, and
    # steps is the accountant's count (the physical-batch count depends on the Poisson draw)
    dp_metrics = privacy.end_round() if privacy is not None else {"dp": 0.0, "epsilon": 0.0, "delta": 0.0}
    if cfg.pretrain.objective != "none":  # the pretraining run's own spend, for the weights' card (client.pretrain)
        dp_metrics["epsilon_run"] = run_spend(privacy, run_id or "run") if privacy is not None else 0.0
    metrics = result.metrics() | dp_metrics
    state = {k: v.detach().cpu() for k, v in screener.state_dict().items()}
    local = site_local_params(cfg, site.data_dir, run_id, screener)
    return site, (local.keep(state) if local else state), metrics


def run_evaluate(
    node_config: dict[str, Any], job_yaml: str, weights: dict[str, torch.Tensor], split: str, server_round: int = 0,
    run_id: str = "",
) -> tuple[SiteIdentity, dict[str, float]]:
    """Evaluate the given weights on this site's ``split`` (val or test).

    Never the training split: metrics of the patients DP-SGD trained on would leave the site
    outside any accounting.
    """
    if split not in EVAL_SPLITS:
        raise ValueError(f"split '{split}' asked by the server: this site answers only for {', '.join(EVAL_SPLITS)}")
    cfg, site, policy, datasets, screener = _prepare(node_config, job_yaml, weights, run_id)
    loader = make_loader(datasets[split], cfg.federation.batch_size, shuffle=False, seed=cfg.seed)
    metrics = (evaluate_pretrain if cfg.pretrain.objective != "none" else evaluate)(screener, loader, site.device)
    if policy.release_noise != "none":  # the site's policy: counts noised and accounted (client.release)
        metrics = release_counts(metrics, policy, PrivacyLedger.load(site.data_dir), run_id=run_id, rnd=server_round,
                                 split=split, n_classes=len(cfg.task.classes))
    return site, metrics


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content[CONFIG]
    weights = record_to_state(msg.content[ARRAYS])
    site, state, metrics = run_train(
        dict(context.node_config), str(config[JOB_KEY]), weights, int(config["server-round"]), str(config.get(RUN_ID_KEY, "")),
        proximal_mu=float(config.get("proximal-mu", 0.0)),  # sent by Flower's FedProx (strategy=fedprox)
    )
    # federation.compression: deltas against the weights received, decoded by the server (shared.compression)
    state, codec = encode_update(state, weights, _job(str(config[JOB_KEY])).federation.compression)
    content = site_reply(
        site_name=site.name, metrics=metrics, allowed=TRAIN_METRIC_KEYS, state=state, expected_keys=set(weights)
    )
    if codec is not None:
        content[COMPRESSION] = codec
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    config = msg.content[CONFIG]
    weights = record_to_state(msg.content[ARRAYS])
    site, metrics = run_evaluate(dict(context.node_config), str(config[JOB_KEY]), weights, str(config.get(SPLIT_KEY, "val")),
                                 int(config.get("server-round", 0)), str(config.get(RUN_ID_KEY, "")))
    return Message(content=site_reply(site_name=site.name, metrics=metrics, allowed=EVAL_METRIC_KEYS), reply_to=msg)


import client.dad  # noqa: E402,F401 -- registers the "query.dad_profile" handler (federated DAD) on this app
