"""The coordinator's round loop with the real ClientApp in-process: poisoned updates, resume."""

import json

import pytest
import torch
from flwr.app import ArrayRecord, Message

from server.federation import run_federation
from shared.config import compose
from shared.messages import ARRAYS
from simulation.synth import write_federation
from tests.inprocess_grid import InProcessGrid

TINY = [
    "num_sites=3", "synth.patients_per_site=[50,45,40]", "synth.image_size=64", "task.image_size=[32,32]",
    "rounds=2", "federation.local_epochs=1", "model.width=8", "model.embed_dim=32", "model.proj_dim=16",
    "task.augment=false", "strategy.max_update_norm=1000",
]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("rounds") / "sites"
    write_federation(compose(TINY + [f"data_root={root}"]))
    return root


def _nodes(n=3):
    return {100 + i: {"partition-id": i} for i in range(n)}


def _rows(run_dir, **match):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def test_a_poisoned_update_is_left_out_and_the_round_goes_on(root, tmp_path):
    def poison(node, reply: Message) -> Message:
        if node == 101 and reply.metadata.message_type == "train":
            state = reply.content[ARRAYS].to_torch_state_dict()
            key = next(k for k, v in state.items() if v.is_floating_point())
            state[key].view(-1)[0] = float("nan")
            reply.content[ARRAYS] = ArrayRecord(state)
        return reply

    cfg = compose(TINY + [f"data_root={root}", f"run_dir={tmp_path}"])
    arrays, recorder = run_federation(InProcessGrid(_nodes(), poison), cfg, tmp_path)
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["round"], e["site"], e["event"]) for e in events] == [(1, "site_b", "update rejected"), (2, "site_b", "update rejected")]
    assert "NaN" in events[0]["reason"]
    assert {r["site"] for r in _rows(tmp_path, phase="train") if r["site"] != "global"} == {"site_a", "site_c"}
    state = arrays.to_torch_state_dict()
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert len(_rows(tmp_path, phase="evaluate", split="test", site="global")) == 1


def test_resume_continues_from_the_last_checkpoint(root, tmp_path):
    first = compose(TINY + [f"data_root={root}", f"run_dir={tmp_path}", "rounds=1"])
    after_one, _ = run_federation(InProcessGrid(_nodes()), first, tmp_path)
    grid = InProcessGrid(_nodes())
    resumed = compose(TINY + [f"data_root={root}", f"run_dir={tmp_path}", "rounds=2", "resume=true"])
    run_federation(grid, resumed, tmp_path)
    first_train = next(m for m in grid.sent if m.metadata.message_type == "train")
    assert first_train.content["config"]["server-round"] == 2
    sent = first_train.content[ARRAYS].to_torch_state_dict()
    for key, value in after_one.to_torch_state_dict().items():
        assert torch.equal(sent[key], value), key  # round 2 started from round 1's checkpoint
    assert sorted({r["round"] for r in _rows(tmp_path, phase="train", site="global")}) == [1, 2]


def _moved(before: ArrayRecord, after: ArrayRecord) -> float:
    a, b = before.to_torch_state_dict(), after.to_torch_state_dict()
    return float(sum(((b[k].double() - a[k].double()) ** 2).sum() for k in a if a[k].is_floating_point()) ** 0.5)


def test_client_level_dp_clips_each_site_and_noises_the_mean(root, tmp_path):
    from client.trainer import build_screener

    base = TINY + [f"data_root={root}", "rounds=1", "federation.local_epochs=1"]
    plain_cfg = compose(base + [f"run_dir={tmp_path / 'plain'}"])
    start = ArrayRecord(build_screener(plain_cfg).state_dict())
    plain, _ = run_federation(InProcessGrid(_nodes()), plain_cfg, tmp_path / "plain")
    dp_cfg = compose(base + [f"run_dir={tmp_path / 'dp'}", "strategy=dp_fedavg", "strategy.client_dp_clip=0.0001",
                             "strategy.min_train_nodes=3"])
    dp, _ = run_federation(InProcessGrid(_nodes()), dp_cfg, tmp_path / "dp")
    assert _moved(start, plain) > 0.2  # a local epoch moves the model far beyond the clip
    events = [json.loads(x) for x in (tmp_path / "dp" / "events.jsonl").read_text().splitlines()]
    noise = float(events[0]["reason"].split("noise multiplier ")[1])
    # the mean of 3 clipped updates moves at most the clip; the rest is the Gaussian noise
    n_params = sum(v.numel() for v in start.to_torch_state_dict().values() if v.is_floating_point())
    expected_noise = noise * 0.0001 / 3 * n_params**0.5
    assert 0.5 * expected_noise < _moved(start, dp) < 0.0001 + 2 * expected_noise


def _own_copy(root, tmp_path):
    import shutil

    return shutil.copytree(root, tmp_path / "sites")


def test_a_run_in_which_every_site_refuses_stops_failed_and_names_the_sites(root, tmp_path):
    """Each site's own policy turns DP on; the run asks for a batch-coupled aux loss, which DP-SGD
    cannot bound, so every site refuses round 1. The run must stop there, failed, naming the sites
    by the names the coordinator registered (an error reply carries no name of its own)."""
    from flwr.app import Context, RecordDict

    from server.app import make_server_app
    from server.federation import RunStopped

    root = _own_copy(root, tmp_path)  # a site's ledger (in its data folder) pins the first DP policy it meets
    policy = tmp_path / "privacy.yaml"
    policy.write_text("enabled: true\ntarget_epsilon: 8.0\ndelta: 1.0e-5\nmax_grad_norm: 1.0\naccountant: rdp\n")
    nodes = {n: c | {"privacy-config": str(policy)} for n, c in _nodes().items()}
    names = {100: "hospital_north", 101: "hospital_east", 102: "hospital_south"}
    run_dir = tmp_path / "run"
    cfg = compose(TINY + [f"data_root={root}", f"run_dir={run_dir}", "rounds=3", "model.aux_loss=supcon",
                          "model.aux_weight=0.5", "strategy.fraction_evaluate=0.0"])
    grid = InProcessGrid(nodes, names=names)
    with pytest.raises(RunStopped) as stop:
        make_server_app(cfg, run_dir)(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    assert stop.value.round == 1 and set(stop.value.reasons) == set(names.values())
    assert all("couples the patients of a batch" in r for r in stop.value.reasons.values()), stop.value.reasons
    assert sum(m.metadata.message_type == "train" for m in grid.sent) == 3  # no round 2 was sent
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert {e["site"] for e in events if e["event"] == "no update"} == set(names.values())
    assert not any(e["site"].startswith("node-") for e in events)
    last = events[-1]
    assert last["event"] == "run stopped" and all(n in last["reason"] for n in names.values())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "hospital_east" in summary["stopped"]
    assert summary["privacy"]["line"] == "DP: no site trained (3 sites refused or failed)"
    assert "Run stopped" in (run_dir / "summary.md").read_text()


def test_the_dp_line_says_what_the_sites_did(root, tmp_path):
    root = _own_copy(root, tmp_path)
    policy = tmp_path / "privacy.yaml"
    policy.write_text("enabled: true\ntarget_epsilon: 8.0\ndelta: 1.0e-5\nmax_grad_norm: 1.0\naccountant: rdp\n")
    nodes = _nodes()
    nodes[100] = nodes[100] | {"privacy-config": str(policy)}  # one site requires DP, the run does not ask for it
    cfg = compose(TINY + [f"data_root={root}", f"run_dir={tmp_path}", "rounds=1", "strategy.fraction_evaluate=0.0",
                          "model.aux_loss=prototype"])
    arrays, recorder = run_federation(InProcessGrid(nodes), cfg, tmp_path)
    line = recorder.finish(arrays)["privacy"]["line"]
    assert line.startswith("DP: 1/3 sites trained with DP-SGD (epsilon spent at the sites ") and line.endswith("; 2/3 trained without DP"), line
