"""Secure aggregation: the server receives masked vectors, yet the aggregate equals FedAvg of the
sites' real updates within the quantisation error. Runs the SecAgg+ ServerApp and the sites'
legacy ClientApp in Flower's simulation engine (the same apps a deployment runs)."""

import numpy as np
import pytest
import torch
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp import ServerApp

from client import secagg_app
from client.app import run_train
from client.trainer import build_screener
from server.secagg import plan_secagg, run_secure_federation
from shared.config import ConfigError, compose, to_yaml
from simulation.synth import write_federation

TINY = [
    "num_sites=3",
    "synth.patients_per_site=[50,40,30]",
    "synth.image_size=48",
    "task.image_size=[32,32]",
    "task.augment=false",
    "model.dropout=0.0",
    "model.width=8",
    "model.embed_dim=32",
    "model.proj_dim=16",
    "rounds=1",
    "federation.local_epochs=1",
    "federation.torch_threads=1",
    "strategy.fraction_evaluate=0.0",
    "strategy.min_evaluate_nodes=1",
]


class SpyGrid:
    """Records every reply the server's workflow receives (what the server 'sees')."""

    def __init__(self, grid, seen: list) -> None:
        self._grid, self._seen = grid, seen

    def send_and_receive(self, messages, timeout=None):
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._seen.extend(replies)
        return replies

    def __getattr__(self, name):
        return getattr(self._grid, name)


def test_plan_refuses_fewer_than_three_sites_and_too_many_dropouts():
    with pytest.raises(ConfigError, match="at least 3 sites"):
        plan_secagg([50, 40], max_dropouts=0)
    with pytest.raises(ConfigError, match="at most 1 dropouts"):
        plan_secagg([50, 40, 30], max_dropouts=2)
    plan = plan_secagg([50, 40, 30, 20, 10], max_dropouts=2)
    assert (plan.num_shares, plan.reconstruction_threshold, plan.max_weight) == (5, 3, 50.0)
    assert plan.clipping_range([np.array([0.3, -0.7])]) == pytest.approx(2.8)


@pytest.mark.deploy
def test_server_sees_only_masked_updates_and_the_sum_matches_fedavg(tmp_path, monkeypatch):
    from flwr.simulation import run_simulation

    from client.randomness import INSECURE_SEED_ENV

    monkeypatch.setenv(INSECURE_SEED_ENV, "secagg-test")  # the sites' shuffles, repeatable to recompute below

    data, run_dir = tmp_path / "sites", tmp_path / "run"
    cfg = compose(TINY + [f"data_root={data}", f"run_dir={run_dir}"])
    write_federation(cfg)
    seen: list = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        run_secure_federation(SpyGrid(grid, seen), context, cfg, run_dir, max_dropouts=1)

    run_simulation(server_app=server_app, client_app=secagg_app.app, num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})

    # what each site would have sent without SecAgg+: its own update, recomputed here
    torch.manual_seed(cfg.seed)
    initial = build_screener(cfg).state_dict()
    updates, counts = [], []
    for pid in range(3):
        _, state, metrics = run_train({"partition-id": pid}, to_yaml(cfg), {k: v.clone() for k, v in initial.items()}, 1)
        updates.append(np.concatenate([v.numpy().ravel() for v in state.values()]))
        counts.append(metrics["num-examples"])
    fedavg = sum(n * u for n, u in zip(counts, updates)) / sum(counts)
    start = np.concatenate([v.numpy().ravel() for v in initial.values()])

    aggregate = torch.load(run_dir / "checkpoints" / "round_0001.pt", weights_only=True)
    got = np.concatenate([v.numpy().ravel() for v in aggregate.values()])
    assert np.abs(fedavg - start).max() > 1e-3  # the sites really moved the model
    assert np.abs(got - fedavg).max() < 1e-4  # SecAgg+ sum == FedAvg within quantisation error

    masked = [
        np.concatenate([bytes_to_ndarray(b).ravel() for b in r.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS][1:]])
        for r in seen
        if not r.has_error() and RECORD_KEY_CONFIGS in r.content and Key.MASKED_PARAMETERS in r.content.config_records[RECORD_KEY_CONFIGS]
    ]
    assert len(masked) == 3
    # no plain update ever reached the server: SecAgg+ empties the reply's arrays
    assert all(len(rec) == 0 for r in seen if not r.has_error() for rec in r.content.array_records.values())
    for m in masked:
        assert m.shape == updates[0].shape
        for u in updates:  # masked integers carry no trace of any site's update
            assert abs(np.corrcoef(m.astype(np.float64), u)[0, 1]) < 0.2


def test_secagg_rounds_take_the_global_model_from_the_sites_copy(tmp_path):
    """shared.model_cache under SecAgg+'s legacy messages: round 2's masked-vector stage carries
    the model the sites kept from round 1's evaluation, by hash, and the run completes."""
    from flwr.simulation import run_simulation

    from shared.model_cache import DeliverOnce

    data, run_dir = tmp_path / "sites", tmp_path / "run"
    cfg = compose(TINY + [f"data_root={data}", f"run_dir={run_dir}", "rounds=2", "strategy.fraction_evaluate=1.0",
                          "strategy.min_evaluate_nodes=3"])
    write_federation(cfg)
    seen: list = []
    delivery: list = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        spy = SpyGrid(grid, seen)
        once = DeliverOnce(spy.send_and_receive)  # what server/app.py puts around the deployed grid
        spy.send_and_receive = once
        delivery.append(once)
        run_secure_federation(spy, context, cfg, run_dir, max_dropouts=1)

    run_simulation(server_app=server_app, client_app=secagg_app.app, num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    assert delivery[0].stripped_bytes > 0  # some model bytes never went down again
    assert not [r for r in seen if r.has_error()], [r.error.reason for r in seen if r.has_error()]
    r1, r2 = (torch.load(run_dir / "checkpoints" / f"round_000{k}.pt", weights_only=True) for k in (1, 2))
    moved = max((r2[k].float() - r1[k].float()).abs().max().item() for k in r1)
    assert moved > 1e-4 and all(torch.isfinite(v.float()).all() for v in r2.values())
