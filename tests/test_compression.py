"""federation.compression: what a compressed train reply carries, and what the server decodes."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from shared.compression import COMPRESSION, decode_reply, encode_update
from shared.config import ConfigError, compose
from shared.messages import ARRAYS, TRAIN_METRIC_KEYS, site_reply


def _model():
    g = torch.Generator().manual_seed(0)
    received = {"w": torch.randn(128, 64, generator=g), "b": torch.randn(32, generator=g),
                "bn.num_batches_tracked": torch.tensor(7)}
    trained = {k: (v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 3)
               for k, v in received.items()}
    return received, trained


def _wire(state, codec):
    """The reply as the client app builds it, through Flower's serialisation and back."""
    content = site_reply(site_name="site_a", metrics={"num-examples": 10}, allowed=TRAIN_METRIC_KEYS, state=state,
                         expected_keys=set(state))
    if codec is not None:
        content[COMPRESSION] = codec
    proto = recorddict_to_proto(content)
    return recorddict_from_proto(proto), proto.ByteSize()


@pytest.mark.parametrize("method, dtype, ratio", [("fp16", np.float16, 0.55), ("int8", np.int8, 0.3)])
def test_compressed_reply_holds_no_fp32_array_and_decodes_within_the_bound(method, dtype, ratio):
    received, trained = _model()
    plain, plain_bytes = _wire(*encode_update(trained, received, "none"))
    content, nbytes = _wire(*encode_update(trained, received, method))
    on_wire = {k: a.numpy().dtype for k, a in content[ARRAYS].items()}
    assert on_wire == {"w": dtype, "b": dtype, "bn.num_batches_tracked": np.int64}
    assert nbytes < ratio * plain_bytes, (nbytes, plain_bytes)

    assert decode_reply(ArrayRecord(received), content) is None
    assert COMPRESSION not in content.config_records
    for key, value in trained.items():
        got = torch.from_numpy(content[ARRAYS][key].numpy())
        assert got.dtype == value.dtype
        if not value.is_floating_point():
            assert torch.equal(got.reshape(value.shape), value)  # Flower sends a 0-d array as 1-d
            continue
        delta = value - received[key]
        # int8: half a step of the array's own scale; fp16: half precision's relative rounding of the delta
        bound = delta.abs().max() / 127 / 2 if method == "int8" else delta.abs() * 2**-11
        assert ((got - value).abs() <= bound + 1e-6).all(), method
    assert plain_bytes > 4 * (128 * 64 + 32)  # the plain reply is the fp32 model


def test_a_reply_the_server_cannot_decode_is_refused_with_the_reason():
    received, trained = _model()
    content, _ = _wire(*encode_update(trained, received, "int8"))
    del content[COMPRESSION]["scale:w"]
    assert "no usable int8 scale" in decode_reply(ArrayRecord(received), content)


def test_compression_and_secure_aggregation_are_refused_together():
    with pytest.raises(ConfigError, match=r"federation\.compression.*secure_aggregation"):
        compose(["federation.compression=int8", "federation.secure_aggregation=true"])
    with pytest.raises(ConfigError, match=r"federation\.compression"):
        compose(["federation.compression=int4"])


def test_int8_updates_train_under_client_level_dp(tmp_path):
    """The real ClientApp sends int8 deltas; the round loop decodes, validates, clips and noises them."""
    from server.federation import run_federation
    from simulation.synth import write_federation
    from tests.inprocess_grid import InProcessGrid

    tiny = ["num_sites=2", "synth.patients_per_site=[40,40]", "synth.image_size=32", "task.image_size=[32,32]",
            "rounds=1", "federation.local_epochs=1", "model.width=8", "model.embed_dim=16", "model.proj_dim=8",
            f"data_root={tmp_path / 'sites'}"]
    write_federation(compose(tiny))
    run_dir = tmp_path / "run"
    cfg = compose(tiny + ["federation.compression=int8", "strategy=dp_fedavg", f"run_dir={run_dir}"])
    wire: set = set()  # dtypes of the float parameters in the train replies, as they leave the sites

    def look(node, reply):
        if reply.metadata.message_type == "train" and not reply.has_error():
            wire.update(a.numpy().dtype for a in reply.content[ARRAYS].values() if a.numpy().dtype != np.int64)
        return reply

    grid = InProcessGrid({100: {"partition-id": 0}, 101: {"partition-id": 1}}, tamper=look)
    run_federation(grid, cfg, run_dir)
    assert wire == {np.dtype(np.int8)}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = {r["site"]: r["update_norm"] for r in rows if r["phase"] == "train" and r["site"] != "global"}
    assert set(trained) == {"site_a", "site_b"} and all(n > 0 for n in trained.values())
    events = (run_dir / "events.jsonl").read_text()
    assert "update rejected" not in events and "client-level DP" in events
