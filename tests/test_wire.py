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
