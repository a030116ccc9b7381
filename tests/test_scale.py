"""Per-site state a process keeps stays bounded as the federation grows (client.site_cache).

A Ray worker plays many simulated sites in turn; what it keeps of each must not grow with their
number. Memory itself is measured by bench/bench_scale.py, not here.
"""

from __future__ import annotations

import numpy as np
import pytest

import client.app as client_app
from client.site import list_sites
from client.site_cache import ByteBoundedCache, nbytes
from client.trainer import build_screener
from shared.config import compose, to_yaml
from simulation.synth import write_federation

MB = 2**20


def test_cache_stays_within_its_byte_bound_as_sites_grow():
    cache = ByteBoundedCache(8 * MB)
    loads = []
    for site in range(50):
        cache.get(site, lambda s=site: loads.append(s) or np.zeros(MB, np.uint8))
        assert cache.bytes <= 8 * MB
    assert len(cache) == 8 and sorted(cache._entries) == list(range(42, 50))  # the 8 most recent
    cache.get(42, lambda: pytest.fail("a kept site is not reloaded"))
    cache.get(50, lambda: np.zeros(MB, np.uint8))
    assert 43 not in cache._entries and 42 in cache._entries  # a hit makes the site recent again
    assert loads == list(range(50))


def test_a_site_larger_than_the_bound_is_still_kept_alone():
    cache = ByteBoundedCache(1 * MB)
    cache.get("small", lambda: np.zeros(MB // 2, np.uint8))
    cache.get("big", lambda: np.zeros(3 * MB, np.uint8))
    assert list(cache._entries) == ["big"]  # a deployed site with more data than the bound never reloads itself
    cache.get("big", lambda: pytest.fail("the newest site is kept"))


def test_clientapp_keeps_site_splits_within_site_cache_mb(tmp_path):
    """Six real sites through the ClientApp's evaluate, with room for about two: the cache never passes its bound."""
    over = ["num_sites=6", "model=mmcl", "task.image_size=[32,32]", "synth.image_size=32", "synth.patients_per_site=[10]",
            "synth.prevalence=[0.4]", "synth.missing_rate=[0.0]", f"data_root={tmp_path / 'fed'}", "device=cpu"]
    write_federation(compose(over))
    probe = compose(over)
    site_bytes = nbytes(client_app._load_datasets(str(list_sites(tmp_path / "fed")[0]), to_yaml(probe), 0, False))
    cfg = compose(over + [f"federation.site_cache_mb={2.5 * site_bytes / MB}"])
    job, weights = to_yaml(cfg), build_screener(cfg).state_dict()
    client_app.SITE_CACHE.clear()
    for rnd in range(2):
        for pid in range(6):
            _, metrics = client_app.run_evaluate({"partition-id": pid}, job, weights, "val", rnd)
            assert metrics["num-examples"] > 0
            assert client_app.SITE_CACHE.bytes <= cfg.federation.site_cache_mb * MB
    assert 1 <= len(client_app.SITE_CACHE) < 6
    client_app.SITE_CACHE.clear()


def _train_reply(rng, n: int, keys=("w", "b")):
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    from shared.messages import ARRAYS, METRICS
    from tests.inprocess_grid import InProcessGrid

    InProcessGrid({})  # Flower's task identity, which a Message needs outside a running app
    state = {k: rng.normal(size=(3, 2)).astype(np.float32) for k in keys} | {"steps": np.array(n, np.int64)}
    content = RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in state.items()}),
                          METRICS: MetricRecord({"num-examples": n, "train_loss": float(rng.random())})})
    return Message(content=content, dst_node_id=0, message_type="train")


def test_the_running_mean_aggregates_as_flowers_fedavg_with_one_model_in_memory():
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian

    from server.streaming import RunningMean, streams

    rng = np.random.default_rng(0)
    replies = [_train_reply(rng, n) for n in (40, 7, 23, 31)]
    want_arrays, want_metrics = FedAvg().aggregate_train(1, [_copy(r) for r in replies])
    fold = RunningMean()
    for reply in replies:
        fold.add(reply)
        assert "arrays" not in reply.content  # each update dropped once folded in
    got_arrays, got_metrics = FedAvg().aggregate_train(1, [fold.as_reply()])
    for key in want_arrays:
        assert got_arrays[key].numpy().dtype == want_arrays[key].numpy().dtype
        np.testing.assert_allclose(got_arrays[key].numpy(), want_arrays[key].numpy(), rtol=1e-6, atol=1e-7)
    assert dict(got_metrics) == pytest.approx(dict(want_metrics))
    assert streams(FedAvg()) and streams(FedAdam()) and not streams(FedMedian())


def test_a_reply_with_other_keys_cannot_be_folded_in():
    from flwr.serverapp.exception import InconsistentMessageReplies

    from server.streaming import RunningMean

    rng = np.random.default_rng(1)
    fold = RunningMean()
    fold.add(_train_reply(rng, 5))
    with pytest.raises(InconsistentMessageReplies):
        fold.add(_train_reply(rng, 5, keys=("w", "other")))


def _copy(reply):
    from flwr.app import Message, RecordDict

    return Message(content=RecordDict(dict(reply.content)), dst_node_id=0, message_type="train")


def test_tensorboard_keeps_nothing_open_and_one_file_per_site_holds_every_round(tmp_path):
    import threading

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from server.tensorboard import RunBoard

    threads = threading.active_count()
    board = RunBoard(tmp_path)
    for rnd in (1, 2, 3):
        rows = [{"round": rnd, "phase": "train", "split": "", "site": f"site_{i}", "time": 1.0 + rnd, "train_loss": rnd + i / 10}
                 for i in range(40)]
        board.write(rows)
        assert threading.active_count() == threads  # no writer thread a site (SummaryWriter had one)
    for i in (0, 39):
        folder = tmp_path / "tensorboard" / f"site_{i}"
        assert len(list(folder.iterdir())) == 1  # appended to, not a new file a round
        acc = EventAccumulator(str(folder))
        acc.Reload()
        assert [(e.step, round(e.value, 4)) for e in acc.Scalars("train/train_loss")] == [(r, round(r + i / 10, 4)) for r in (1, 2, 3)]


def test_the_recorder_keeps_site_rows_and_histogram_bins_in_the_file_not_in_memory(tmp_path):
    import json

    from server.report import RunRecorder

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 9, "phase": "train", "split": "", "site": "old"}) + "\n")
    cfg = compose(["num_sites=2"])
    rec = RunRecorder(tmp_path, cfg)
    for rnd in (1, 2):
        rec.metrics(rnd, "evaluate", "site_a", {"auc": 0.7, "num-examples": 9, "hist_neg_00": 3, "hist_pos_00": 1}, split="val")
        rec.metrics(rnd, "evaluate", "global", {"auc": 0.6 + rnd / 10, "hist_neg_00": 3}, split="val")
    # in memory: the pooled rows only, without their bins (a site's rows grew the coordinator every round)
    assert [r["auc"] for r in rec.pooled] == [0.7, 0.8] and not any(k.startswith("hist_") for k in rec.pooled[0])
    assert "site_a" not in repr(vars(rec))
    # read back from the file: this run's rows (not the earlier run's "old"), without bins
    assert [(r["round"], r["site"]) for r in rec.rows] == [(1, "site_a"), (1, "global"), (2, "site_a"), (2, "global")]
    assert not any(k.startswith("hist_") for r in rec.rows for k in r)
    assert [r["round"] for r in rec.select(phase="evaluate", split="val", site="site_a")] == [1, 2]
    on_disk = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert on_disk[1]["hist_neg_00"] == 3 and on_disk[1]["hist_pos_00"] == 1  # the ROC of `fedmsk report` reads them there
    # a resumed run reads everything the folder recorded, and its pooled rows are back in memory
    resumed = RunRecorder(tmp_path, compose(["num_sites=2", "resume=true"]))
    assert [r["site"] for r in resumed.rows][:2] == ["old", "site_a"] and [r["auc"] for r in resumed.pooled] == [0.7, 0.8]
    rows, end = resumed.read_rows(resumed.end_offset())
    assert rows == [] and end == resumed.end_offset()
