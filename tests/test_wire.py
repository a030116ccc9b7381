"""What leaves a site, and what the server accepts from one."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, RecordDict

from server.validation import check_update
from shared.messages import (
    ARRAYS,
    EVAL_METRIC_KEYS,
    TRAIN_METRIC_KEYS,
    ReplyRefused,
    site_reply,
)


def _state():
    return {"w": torch.ones(3, 2), "b": torch.zeros(2)}


def test_reply_holds_only_model_arrays_scalar_metrics_and_the_site_name():
    reply = site_reply(site_name="site_a", metrics={"num-examples": 10, "train_loss": 0.3}, allowed=TRAIN_METRIC_KEYS,
                       state=_state(), expected_keys={"w", "b"})
    assert set(reply.array_records) == {ARRAYS} and set(reply[ARRAYS]) == {"w", "b"}
    assert dict(reply["site"]) == {"name": "site_a"}
    assert set(reply.metric_records["metrics"]) == {"num-examples", "train_loss"}


@pytest.mark.parametrize(
    "metrics, state, expected",
    [
        ({"patient_id": 1.0}, None, None),  # not whitelisted
        ({"auc": [0.1, 0.9]}, None, None),  # per-patient list smuggled as a metric
        ({"auc": 0.7}, {"w": torch.ones(3, 2), "embeddings": torch.ones(5, 8)}, {"w"}),  # extra array
    ],
)
def test_anything_but_weights_and_whitelisted_scalars_is_refused(metrics, state, expected):
    with pytest.raises(ReplyRefused):
        site_reply(site_name="s", metrics=metrics, allowed=EVAL_METRIC_KEYS, state=state, expected_keys=expected)


def _reply(state):
    return RecordDict({ARRAYS: ArrayRecord({k: v for k, v in state.items()})})


def test_server_accepts_a_sane_update_and_reports_its_norm():
    glob = ArrayRecord(_state())
    upd = _state()
    upd["w"] = upd["w"] + 0.5  # 6 entries moved by 0.5 -> norm sqrt(1.5)
    verdict = check_update(glob, _reply(upd), max_update_norm=10)
    assert verdict.ok and verdict.update_norm == pytest.approx(np.sqrt(1.5))


@pytest.mark.parametrize(
    "poison, reason",
    [
        (lambda s: s | {"w": torch.full((3, 2), float("nan"))}, "NaN"),
        (lambda s: s | {"w": torch.ones(2, 3)}, "shape"),
        (lambda s: {"w": s["w"]}, "missing"),
        (lambda s: s | {"w": s["w"] * 1e6}, "norm"),
    ],
)
def test_poisoned_updates_are_rejected_with_the_reason(poison, reason):
    verdict = check_update(ArrayRecord(_state()), _reply(poison(_state())), max_update_norm=100)
    assert not verdict.ok and reason in verdict.reason


# --- the global model goes down once a round (shared.model_cache) ---------------------------------

import json  # noqa: E402

from flwr.app import ConfigRecord, Context, Message  # noqa: E402
from flwr.common.serde import recorddict_to_proto  # noqa: E402

from server.federation import run_federation  # noqa: E402
from shared.config import compose  # noqa: E402
from shared.messages import CONFIG, SPLIT_KEY  # noqa: E402
from shared.model_cache import HELD, MISS, REF, DeliverOnce, arrays_hash, model_cache_mod  # noqa: E402
from simulation.synth import write_federation  # noqa: E402
from tests.inprocess_grid import InProcessGrid  # noqa: E402

TINY = ["num_sites=3", "synth.patients_per_site=[40,36,32]", "synth.image_size=64", "task.image_size=[32,32]",
        "rounds=2", "federation.local_epochs=1", "model.width=8", "model.embed_dim=32", "model.proj_dim=16"]


class _Counting(InProcessGrid):
    """Bytes each node receives per (round, phase, split), as Flower serialises the message."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.down: list[tuple[int, int, str, int, bool]] = []  # (node, round, phase/split, bytes, carried arrays)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for msg in messages:
            cfg = msg.content.config_records.get(CONFIG)
            phase = msg.metadata.message_type + ("/" + str(cfg.get(SPLIT_KEY, "")) if msg.metadata.message_type == "evaluate" else "")
            self.down.append((msg.metadata.dst_node_id, int(cfg["server-round"]), phase,
                              recorddict_to_proto(msg.content).ByteSize(), bool(msg.content.array_records)))
        return super().send_and_receive(messages, timeout=timeout)


def _federate(tmp_path, on_reply=None):
    root = tmp_path / "sites"
    cfg = compose(TINY + [f"data_root={root}", f"run_dir={tmp_path / 'run'}"])
    write_federation(cfg)
    grid = _Counting({100 + i: {"partition-id": i} for i in range(3)})
    if on_reply is not None:
        grid.tamper = lambda node, reply: on_reply(grid, node, reply)
    grid.send_and_receive = DeliverOnce(grid.send_and_receive)
    run_federation(grid, cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    model = sum(len(a.data) for a in grid.sent[0].content["arrays"].values()) if grid.sent[0].content.array_records else 0
    return grid, rows, model


def test_each_site_downloads_the_global_model_once_a_round_and_every_round_is_evaluated(tmp_path):
    grid, rows, model = _federate(tmp_path)
    for node in (100, 101, 102):
        for rnd in (1, 2):
            got = sum(b for n, r, phase, b, _ in grid.down if n == node and r == rnd and phase != "evaluate/test")
            assert model < got < 1.1 * model, (node, rnd, got, model)  # was 2 x: evaluate, then train again
    assert not any(arrays for _, r, phase, _, arrays in grid.down if phase == "train")  # every train came from the cache
    val = {r["round"] for r in rows if r["phase"] == "evaluate" and r["split"] == "val" and r["site"] == "global"}
    assert val == {0, 1, 2}
    assert {r["site"] for r in rows if r["phase"] == "train" and r["round"] == 2} >= {"site_a", "site_b", "site_c"}
    assert any(r["split"] == "test" and r["site"] == "global" for r in rows if r["phase"] == "evaluate")


def test_a_site_that_lost_its_copy_gets_the_full_model_again_and_trains_on_it(tmp_path):
    def restart_after_round_1_val(grid, node, reply):  # node 101's SuperNode restarts: its context.state is gone
        msg = grid.sent[-1]
        if node == 101 and msg.metadata.message_type == "evaluate" and int(msg.content[CONFIG]["server-round"]) == 1:
            grid.states[101] = RecordDict()
        return reply

    grid, rows, _ = _federate(tmp_path, restart_after_round_1_val)
    train2 = [(n, arrays) for n, r, phase, _, arrays in grid.down if r == 2 and phase == "train"]
    assert sorted(train2) == [(100, False), (101, False), (101, True), (102, False)]  # asked again, sent in full
    assert {r["site"] for r in rows if r["phase"] == "train" and r["round"] == 2} >= {"site_a", "site_b", "site_c"}


def _msg(content):
    InProcessGrid({})  # sets Flower's task identity, which a Message needs outside a running app
    return Message(content=content, dst_node_id=1, message_type="train")


def test_the_site_refuses_a_missing_or_stale_copy_and_hands_the_named_one_to_the_handler():
    arrays = ArrayRecord(_state())
    digest = arrays_hash(arrays)
    seen = []

    def handler(msg, ctx):
        seen.append(msg.content["arrays"].to_torch_state_dict())
        return Message(RecordDict(), reply_to=msg)

    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    ref = {REF: ConfigRecord({"key": "arrays", "hash": digest})}
    missing = model_cache_mod(_msg(RecordDict(dict(ref))), ctx, handler)
    assert missing.has_error() and missing.error.reason.startswith(MISS) and not seen
    stale = _state() | {"w": torch.full((3, 2), 2.0)}
    ctx.state[HELD] = ArrayRecord(stale)  # a copy of another round's model, same names and shapes
    assert model_cache_mod(_msg(RecordDict(dict(ref))), ctx, handler).error.reason.startswith(MISS) and not seen
    assert not model_cache_mod(_msg(RecordDict({"arrays": arrays} | ref)), ctx, handler).has_error()  # kept
    assert not model_cache_mod(_msg(RecordDict(dict(ref))), ctx, handler).has_error()
    assert len(seen) == 2 and all(torch.equal(s["w"], torch.ones(3, 2)) for s in seen)


def test_a_message_sent_without_arrays_is_still_answered_packed():
    """A train message whose model the site holds carries no arrays; its reply (the update) must
    still go back as one packed array (shared.packing), not one Flower object per tensor."""
    from shared.packing import PACKED, is_packed, pack_content, packed_arrays_mod

    sent = pack_content(RecordDict({CONFIG: ConfigRecord({"server-round": 2})}))
    assert is_packed(sent)

    def handler(msg, ctx):
        return Message(RecordDict({"arrays": ArrayRecord(_state())}), reply_to=msg)

    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = packed_arrays_mod(_msg(sent), ctx, handler)
    assert list(reply.content["arrays"]) == [PACKED]
