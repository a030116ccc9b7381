"""Strategies chosen by config: FedProx at the site, FedAdam/FedYogi resume, site-local
parameters (FedBN), robust aggregation under poisoning, exclusion of a site that keeps failing,
and TensorBoard scalars written as the run goes."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from torch import nn

from client.local_state import NORM_TOKEN, SiteLocalParams, local_keys
from client.proximal import ProximalTerm
from client.trainer import build_screener, train_local
from server.federation import run_federation
from server.strategy import build_strategy
from shared.config import ConfigError, compose
from shared.messages import ARRAYS, METRICS, SITE
from simulation.synth import write_federation
from tests.inprocess_grid import InProcessGrid

SCRIPTED = ["model=logreg", "strategy.fraction_evaluate=0", "rounds=3"]


class ScriptedGrid(InProcessGrid):
    """Sites that answer a train message with ``sent + delta(node, round)`` (no training), so two
    runs of the round loop can be compared bit for bit; ``nan_nodes`` send NaN weights."""

    def __init__(self, n_sites=3, nan_nodes=(), on_round=None):
        super().__init__({i: {} for i in range(n_sites)})
        self.nan_nodes, self.on_round = set(nan_nodes), on_round or (lambda rnd: None)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for i, msg in enumerate(messages):
            self.sent.append(msg)
            node, rnd = msg.metadata.dst_node_id, int(msg.content["config"]["server-round"])
            if i == 0:
                self.on_round(rnd)
            rng = np.random.default_rng(1000 * node + rnd)
            arrays = {k: v.numpy() + rng.normal(0, 0.05, v.numpy().shape).astype(v.numpy().dtype)
                      for k, v in msg.content[ARRAYS].items()}
            if node in self.nan_nodes:
                arrays = {k: np.full_like(v, np.nan) for k, v in arrays.items()}
            content = RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                                  METRICS: MetricRecord({"num-examples": 10 + node, "train_loss": 1.0 / rnd}),
                                  SITE: ConfigRecord({"name": f"site_{node}"})})
            replies.append(Message(content=content, reply_to=msg))
        return replies


def _events(run_dir):
    path = run_dir / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


# --- FedProx -------------------------------------------------------------------------------

def _toy_loader(n=64, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] + 0.3 * torch.randn(n, generator=g) > 0).long()
    items = [{"image": torch.zeros(1, 4, 4), "clinical": x[i], "label": y[i]} for i in range(n)]
    return torch.utils.data.DataLoader(items, batch_size=16, shuffle=False)


def test_fedprox_term_pulls_the_site_model_toward_the_global_weights(mu=1.0):
    cfg = compose(["model=clinical_only", "federation.local_epochs=5", "federation.lr=0.05", "model.dropout=0"])
    moved = {}
    for m in (0.0, mu):
        torch.manual_seed(0)
        screener = build_screener(cfg)
        start = [p.detach().clone() for p in screener.parameters()]
        train_local(screener, _toy_loader(), cfg.federation, "cpu", proximal_mu=m)
        moved[m] = float(sum(((p.detach() - s) ** 2).sum() for p, s in zip(screener.parameters(), start)) ** 0.5)
    assert moved[0.0] > 0.1
    assert moved[mu] < 0.7 * moved[0.0], moved


def test_fedprox_term_is_added_after_dp_clipping_and_noise():
    """Under Opacus the data gradient is clipped (here to ~0); the proximal gradient is not."""
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    prox = ProximalTerm(model, mu=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)  # w - w_global = 0.1 everywhere
    before = [p.detach().clone() for p in model.parameters()]
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    loader = torch.utils.data.DataLoader(data, batch_size=32)
    engine = PrivacyEngine(accountant="rdp")
    module, optimizer, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                                    data_loader=loader, noise_multiplier=0.0, max_grad_norm=1e-9)
    prox.attach(optimizer)
    x, y = next(iter(loader))
    nn.functional.cross_entropy(module(x), y).backward()
    optimizer.step()
    for p, b in zip(model.parameters(), before):
        # w <- w - lr * (clipped data grad ~ 0 + mu * (w - w_global)); a term inside the loss would be clipped away
        torch.testing.assert_close(p.detach(), b - 0.5 * 0.1, atol=1e-6, rtol=0)


def test_fedprox_config_sends_mu_and_refuses_mu_zero():
    cfg = compose(["strategy=fedprox", "strategy.proximal_mu=0.3"])
    strategy = build_strategy(cfg)
    grid = ScriptedGrid(2)
    msgs = list(strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(2))}), ConfigRecord({}), grid))
    assert all(float(m.content["config"]["proximal-mu"]) == 0.3 for m in msgs)
    with pytest.raises(ConfigError, match="proximal_mu"):
        compose(["strategy=fedprox", "strategy.proximal_mu=0"])


# --- FedAdam / FedYogi resume -------------------------------------------------------------

@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_server_optimiser_state_survives_a_resume(name, tmp_path):
    base = SCRIPTED + [f"strategy={name}"]
    straight, _ = run_federation(ScriptedGrid(), compose(base + [f"run_dir={tmp_path / 'a'}"]), tmp_path / "a")
    run_federation(ScriptedGrid(), compose(base + [f"run_dir={tmp_path / 'b'}", "rounds=2"]), tmp_path / "b")
    assert (tmp_path / "b" / "checkpoints" / "round_0002.strategy.npz").is_file()
    resumed, _ = run_federation(ScriptedGrid(), compose(base + [f"run_dir={tmp_path / 'b'}", "resume=true"]), tmp_path / "b")
    a, b = straight.to_torch_state_dict(), resumed.to_torch_state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-7)
    # fresh moments on resume would take a different step: the saved state is what makes them equal
    (tmp_path / "b" / "checkpoints" / "round_0003.strategy.npz").unlink()
    with pytest.raises(FileNotFoundError, match="optimiser state"):
        run_federation(ScriptedGrid(), compose(base + [f"run_dir={tmp_path / 'b'}", "resume=true"]), tmp_path / "b")


# --- robust aggregation --------------------------------------------------------------------

def _replies(models, n_examples=20):
    out = []
    for node, model in enumerate(models):
        msg = Message(RecordDict(), message_type="train", dst_node_id=node)
        content = RecordDict({ARRAYS: ArrayRecord({"w": Array(model.astype(np.float32))}),
                              METRICS: MetricRecord({"num-examples": n_examples})})
        out.append(Message(content=content, reply_to=msg))
    return out


@pytest.mark.parametrize("attack", ["scaled", "sign_flipped"])
@pytest.mark.parametrize("name, extra", [("fedmedian", []), ("fedtrimmedavg", []),
                                         ("krum", ["strategy.num_malicious=1", "strategy.min_train_nodes=5"]),
                                         ("multikrum", ["strategy.num_malicious=1", "strategy.num_selected=3",
                                                        "strategy.min_train_nodes=5"])])
def test_one_poisoned_site_does_not_move_a_robust_aggregate(name, extra, attack):
    InProcessGrid({})  # Flower's message ids need a task identity
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=200)
    honest = [w0 + 0.1 + rng.normal(0, 0.05, 200) for _ in range(5)]
    mean = np.mean(honest, axis=0)
    update = mean - w0
    bad = w0 + 50 * update if attack == "scaled" else w0 - 20 * update
    envelope = float(np.sqrt((np.max(np.abs(np.stack(honest) - mean), axis=0) ** 2).sum()))

    def aggregate(strategy_name, overrides):
        strategy = build_strategy(compose([f"strategy={strategy_name}", *overrides]))
        arrays, _ = strategy.aggregate_train(1, _replies(honest + [bad]))
        return arrays["w"].numpy().astype(np.float64)

    robust = np.linalg.norm(aggregate(name, extra) - mean)
    plain = np.linalg.norm(aggregate("fedavg", []) - mean)
    assert plain > 5 * envelope  # the attack matters to FedAvg ...
    assert robust <= envelope, (robust, envelope)  # ... and stays inside the honest sites' envelope here


# --- exclusion -----------------------------------------------------------------------------

def test_a_site_rejected_n_rounds_in_a_row_is_excluded_and_the_coordinator_told(tmp_path, caplog):
    cfg = compose(SCRIPTED + ["rounds=4", "strategy.exclude_after_rejections=2", f"run_dir={tmp_path}"])
    grid = ScriptedGrid(3, nan_nodes={1})
    with caplog.at_level("WARNING", logger="fedmsk.server"):
        run_federation(grid, cfg, tmp_path)
    events = [(e["round"], e["site"], e["event"]) for e in _events(tmp_path)]
    assert events == [(1, "site_1", "update rejected"), (2, "site_1", "update rejected"), (2, "site_1", "site excluded")]
    assert any("site excluded" in r.getMessage() for r in caplog.records)
    per_round = {}
    for m in grid.sent:
        per_round.setdefault(int(m.content["config"]["server-round"]), set()).add(m.metadata.dst_node_id)
    assert per_round == {1: {0, 1, 2}, 2: {0, 1, 2}, 3: {0, 2}, 4: {0, 2}}


def test_without_the_setting_a_failing_site_is_asked_every_round(tmp_path):
    cfg = compose(SCRIPTED + [f"run_dir={tmp_path}"])
    grid = ScriptedGrid(3, nan_nodes={1})
    run_federation(grid, cfg, tmp_path)
    assert [e["event"] for e in _events(tmp_path)] == ["update rejected"] * 3


# --- TensorBoard ---------------------------------------------------------------------------

def _scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_tensorboard_holds_every_rounds_scalars_per_site_and_global_as_the_run_goes(tmp_path):
    seen_during = {}

    def peek(rnd):  # what TensorBoard would show while round `rnd` is being trained
        if rnd == 3:
            seen_during.update({s: _scalars(tmp_path / "tensorboard" / s, "train/train_loss") for s in ("site_0", "global")})

    run_federation(ScriptedGrid(3, on_round=peek), compose(SCRIPTED + [f"run_dir={tmp_path}"]), tmp_path)
    assert [step for step, _ in seen_during["site_0"]] == [1, 2]
    assert [step for step, _ in seen_during["global"]] == [1, 2]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for site in ("site_0", "site_1", "site_2", "global"):
        expected = [(r["round"], r["train_loss"]) for r in rows if r["site"] == site and r["phase"] == "train"]
        got = _scalars(tmp_path / "tensorboard" / site, "train/train_loss")
        assert [s for s, _ in got] == [r for r, _ in expected] == [1, 2, 3]
        np.testing.assert_allclose([v for _, v in got], [v for _, v in expected], rtol=1e-6)
    assert _scalars(tmp_path / "tensorboard" / "site_1", "train/update_norm")


# --- site-local parameters (FedBN) ---------------------------------------------------------

TINY = [
    "num_sites=3", "synth.patients_per_site=[40,36,32]", "synth.image_size=64", "task.image_size=[32,32]",
    "rounds=2", "federation.local_epochs=1", "model=clinical_only", "task.augment=false",
]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fedbn") / "sites"
    write_federation(compose(TINY + [f"data_root={root}"]))
    return root


def test_fedbn_norm_layers_never_leave_a_site_and_persist_there(root, tmp_path):
    cfg = compose(TINY + [f"data_root={root}", f"run_dir={tmp_path}", "strategy=fedbn"])
    norm = local_keys(build_screener(cfg), [NORM_TOKEN])
    assert norm and all("clinical.net.1." in k or "clinical.net.5." in k for k in norm)
    replies = []
    grid = InProcessGrid({100 + i: {"partition-id": i} for i in range(3)},
                         tamper=lambda node, reply: replies.append(reply) or reply)
    torch.manual_seed(cfg.seed)
    initial = build_screener(cfg).state_dict()
    final, _ = run_federation(grid, cfg, tmp_path)
    # nothing named a norm parameter went out to a site or came back from one
    assert grid.sent and replies
    for msg in grid.sent + [r for r in replies if not r.has_error()]:
        if ARRAYS in msg.content.array_records:
            assert not set(msg.content[ARRAYS]) & norm
    trained = [r for r in replies if r.metadata.message_type == "train"]
    assert len(trained) == 6 and all(not r.has_error() for r in trained)
    # the global model keeps its initial norm values; each site kept and trained its own
    state = final.to_torch_state_dict()
    for key in norm:
        torch.testing.assert_close(state[key], initial[key])
    kept = [torch.load(f, weights_only=True) for f in sorted(root.glob(f"site_*/.fedmsk/local_params/{tmp_path.name}.pt"))]
    assert len(kept) == 3
    assert all(any(not torch.equal(k[key], initial[key]) for key in norm) for k in kept)
    assert any(not torch.equal(kept[0][key], kept[1][key]) for key in norm)


def test_site_local_params_fill_from_the_site_store_not_the_server(tmp_path):
    module = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    keys = local_keys(module, [NORM_TOKEN])
    assert keys == {"1.weight", "1.bias"}
    store = SiteLocalParams(tmp_path, "run-1", keys)
    fresh = {k: v.clone() for k, v in module.state_dict().items()}
    full = store.fill({"0.weight": torch.ones(3, 3), "0.bias": torch.zeros(3)}, fresh)
    assert set(full) == set(fresh)
    trained = dict(full) | {"1.weight": torch.full((3,), 7.0)}
    assert set(store.keep(trained)) == {"0.weight", "0.bias"}  # what is sent
    again = store.fill({"0.weight": torch.ones(3, 3), "0.bias": torch.zeros(3)}, fresh)
    assert torch.equal(again["1.weight"], torch.full((3,), 7.0))  # the site's own value, next round


def test_local_params_naming_nothing_or_everything_is_refused():
    with pytest.raises(ConfigError, match="names no parameter"):
        compose(["strategy=fedbn", "model=logreg"])  # logreg has no normalisation layer
    with pytest.raises(ConfigError, match="names no parameter"):
        compose(["strategy.local_params=[net.nothing.*]"])
    with pytest.raises(ConfigError, match="every parameter"):
        compose(["model=logreg", "strategy.local_params=[net.*]"])


def test_tensorboard_tags_leave_out_histogram_bins_and_undefined_values():
    from server.tensorboard import scalar_tags

    row = {"round": 2, "phase": "evaluate", "split": "val", "site": "site_a", "time": 1.0,
           "auc": 0.8, "loss": float("nan"), "pre": None, "hist_neg_00": 3.0, "hist_pos_00": 1.0}
    assert scalar_tags(row) == {"val/auc": 0.8}


def test_strategies_secure_aggregation_cannot_run_are_refused_at_start():
    with pytest.raises(ConfigError, match="SecAgg"):
        compose(["strategy=fedmedian", "federation.secure_aggregation=true"])
    compose(["strategy=fedavg", "federation.secure_aggregation=true"])  # the one it runs


def test_an_excluded_site_stays_excluded_after_a_resume(tmp_path):
    base = SCRIPTED + ["strategy.exclude_after_rejections=1", f"run_dir={tmp_path}"]
    run_federation(ScriptedGrid(3, nan_nodes={1}), compose(base + ["rounds=1"]), tmp_path)
    grid = ScriptedGrid(3, nan_nodes={1})
    run_federation(grid, compose(base + ["rounds=3", "resume=true"]), tmp_path)
    assert {m.metadata.dst_node_id for m in grid.sent} == {0, 2}
