"""One array per message on the wire instead of one per tensor (deployment only).

Flower 1.41 moves a message as a tree of objects, and every ``Array`` of an ``ArrayRecord`` is
its own object (plus its chunks): MM-CL's state dict is 76 tensors, 122 objects, and each object
is one HTTP request and one SQLite transaction at the SuperLink, both ways, for every site
(``flwr/supercore/inflatable``). Measured on the 2-core machine under load
(bench/bench_deploy.py), three sites pushing their replies took 50 s at about 12 objects a
second, against 1-2 s of training: the object count, not the bytes, was the round.

``pack_content`` replaces each ``ArrayRecord`` of a message with one holding a single byte
array (every tensor's raw bytes back to back) and a ``ConfigRecord`` with the names, dtypes and
shapes; ``unpack_content`` restores it exactly (same names, order, dtypes, values). The
ServerApp packs what it sends and unpacks what it receives (server/reply_poll.py); the
ClientApp does the same in ``packed_arrays_mod``, and answers a packed message packed. A
message without the layout passes untouched (simulation, SecAgg+'s legacy messages, other apps).
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

LAYOUT = ".fedmsk-packed"  # suffix of the ConfigRecord key that describes a packed ArrayRecord
PACKED = "packed"  # the one Array of a packed ArrayRecord
MARK = "fedmsk" + LAYOUT  # in every packed message, so a message without arrays (shared.model_cache) is answered packed


def pack_record(record: ArrayRecord) -> tuple[ArrayRecord, ConfigRecord]:
    arrays = [(name, record[name].numpy()) for name in record]
    layout = ConfigRecord({"names": [n for n, _ in arrays],
                           "dtypes": [a.dtype.str for _, a in arrays],
                           "shapes": json.dumps([list(a.shape) for _, a in arrays])})
    blob = b"".join(np.ascontiguousarray(a).tobytes() for _, a in arrays)
    return ArrayRecord({PACKED: Array(np.frombuffer(blob, dtype=np.uint8))}), layout


def unpack_record(record: ArrayRecord, layout: ConfigRecord) -> ArrayRecord:
    blob = record[PACKED].numpy().tobytes()
    out, offset = {}, 0
    for name, dtype, shape in zip(layout["names"], layout["dtypes"], json.loads(str(layout["shapes"]))):
        dt = np.dtype(str(dtype))
        size = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        count = int(np.prod(shape, dtype=np.int64))
        out[str(name)] = Array(np.frombuffer(blob, dtype=dt, count=count, offset=offset).reshape(shape).copy())
        offset += size
    if offset != len(blob):
        raise ValueError(f"packed arrays: the layout describes {offset} bytes, the message holds {len(blob)}")
    return ArrayRecord(out)


def is_packed(content: RecordDict) -> bool:
    return any(key.endswith(LAYOUT) for key in content)


def pack_content(content: RecordDict) -> RecordDict:
    """``content`` with every ArrayRecord of two or more arrays packed into one array."""
    out = RecordDict({MARK: ConfigRecord({})})
    for key, record in content.items():
        if isinstance(record, ArrayRecord) and len(record) > 1:
            out[key], out[key + LAYOUT] = pack_record(record)
        else:
            out[key] = record
    return out


def unpack_content(content: RecordDict) -> RecordDict:
    """The inverse of ``pack_content`` (a content without layouts comes back as it is)."""
    if not is_packed(content):
        return content
    out = RecordDict()
    for key, record in content.items():
        if key.endswith(LAYOUT):
            continue
        layout = content.get(key + LAYOUT)
        out[key] = unpack_record(record, layout) if isinstance(layout, ConfigRecord) else record
    return out


def packed_arrays_mod(msg: Message, context: Context, call_next) -> Message:
    """ClientApp mod: unpack a packed message for the handler, pack its reply the same way."""
    if not msg.has_content() or not is_packed(msg.content):
        return call_next(msg, context)
    msg.content = unpack_content(msg.content)
    reply = call_next(msg, context)
    if reply.has_content():
        reply.content = pack_content(reply.content)
    return reply
