"""Compressed site updates (``federation.compression``): what a train reply carries instead of
fp32 weights, and how the server gets the weights back before it validates and aggregates.

A site sends the change it made to the global weights it received (the delta), not the
weights: deltas are small and centred on zero, so they survive fewer bits. ``fp16`` sends the
delta in half precision (half the bytes); ``int8`` quantises each array's delta symmetrically to
[-127, 127] with one fp32 scale per array (a quarter of the bytes; the scales travel in a
ConfigRecord so no fp32 array is left in the reply). Integer buffers (BatchNorm's
``num_batches_tracked``) travel unchanged. Round-to-nearest keeps every decoded entry within
half a quantisation step (``scale / 2``) of the site's true weight.

Flower has no update codec for the Message API (its SecAgg+ quantisation exists only inside the
legacy secure-aggregation workflow), hence this module. It composes with client-level DP
(``strategy=dp_fedavg``: the server clips and noises the decoded update, a post-processing of
what the site released) and sample-level DP-SGD; SecAgg+ masks integers it quantises itself,
so ``shared.config.validate`` refuses compression together with ``federation.secure_aggregation``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from shared.messages import ARRAYS

COMPRESSION = "compression"  # reply ConfigRecord: the method and the int8 scales
METHOD_KEY = "method"
_SCALE = "scale:"  # + array name
_WIRE_DTYPE = {"fp16": torch.float16, "int8": torch.int8}
INT8_LEVELS = 127


def encode_update(
    new: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor], method: str
) -> tuple[dict[str, torch.Tensor], ConfigRecord | None]:
    """The arrays a site sends for its trained weights ``new``, and the record that says how to decode them.

    ``method`` none returns ``new`` as it is (and no record).
    """
    if method == "none":
        return dict(new), None
    if method not in _WIRE_DTYPE:
        raise ValueError(f"federation.compression '{method}' is not none, fp16 or int8")
    out: dict[str, torch.Tensor] = {}
    record = ConfigRecord({METHOD_KEY: method})
    for key, value in new.items():
        if not value.is_floating_point():
            out[key] = value
            continue
        delta = value.detach().cpu().double() - received[key].detach().cpu().double()
        if method == "fp16":
            out[key] = delta.to(torch.float16)
            continue
        peak = float(delta.abs().max()) if delta.numel() else 0.0
        scale = peak / INT8_LEVELS
        q = torch.zeros_like(delta) if scale == 0.0 else torch.round(delta / scale)
        out[key] = q.clamp(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
        record[_SCALE + key] = scale
    return out, record


def decode_reply(sent: ArrayRecord, content: RecordDict) -> str | None:
    """Replace a compressed reply's arrays by the fp32 weights they encode against ``sent``, in place.

    Returns None when the reply is usable (compressed or not), or why it cannot be decoded; the
    round loop then leaves that site out (server.federation). Names or shapes that differ from
    the model pass through undecoded, for ``server.validation.check_update`` to name.
    """
    record = content.config_records.get(COMPRESSION)
    if record is None or ARRAYS not in content.array_records:
        return None
    method = str(record.get(METHOD_KEY, ""))
    if method not in _WIRE_DTYPE:
        return f"compressed with '{method}', which this server does not decode (fp16, int8)"
    wire_dtype = np.dtype(str(_WIRE_DTYPE[method]).removeprefix("torch."))
    decoded: dict[str, np.ndarray] = {}
    for key, array in content[ARRAYS].items():
        value = array.numpy()
        ref = sent[key].numpy() if key in sent else None
        if ref is None or ref.dtype.kind != "f" or value.shape != ref.shape:
            decoded[key] = value
            continue
        if value.dtype != wire_dtype:
            return f"array '{key}' is {value.dtype} in a reply compressed with {method} ({wire_dtype} expected)"
        delta = value.astype(np.float64)
        if method == "int8":
            scale = record.get(_SCALE + key)
            if not isinstance(scale, float) or not np.isfinite(scale) or scale < 0:
                return f"array '{key}' has no usable int8 scale in the reply"
            delta = delta * scale
        decoded[key] = (ref.astype(np.float64) + delta).astype(ref.dtype)
    content[ARRAYS] = ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in decoded.items()})
    del content[COMPRESSION]
    return None
