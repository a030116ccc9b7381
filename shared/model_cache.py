"""The global model goes down to a site once a round, not twice (deployment).

Each round the coordinator sends the new global model in the evaluate message (that round's
validation) and the same arrays again in the next round's train message; round 0's
evaluation and round 1's training likewise share the initial model. ``DeliverOnce`` (the
ServerApp's grid, server/app.py) remembers, per node, the SHA-256 of the last arrays that node
acknowledged with a reply, and sends a message whose arrays the node already holds without
them: a ``ConfigRecord`` under ``REF`` names the record key and the hash instead. Every message
that does carry arrays carries the same record, which tells the site to keep them.

At the site, ``model_cache_mod`` (outermost ClientApp mod, client/secagg_app.py) keeps the
arrays of the last message in Flower's ``context.state`` (the SuperNode stores it per run
between messages, on the site's own machine: nothing goes over the network) and puts them back
into a message that came without them, after checking their hash. A site without them, or
with other ones (it restarted, joined late, or missed the previous message), answers with an
error reply whose reason starts with ``MISS``; ``DeliverOnce`` then sends that site the full
message again, within the same exchange. A site never evaluates or trains on weights other than
the ones the server named.

Why not evaluate the received model at the start of the next train message instead: that
moves every round's validation one message later (the coordinator's per-round AUC, model
selection and the report would read a round late), needs a separate final evaluation anyway,
and does not fit SecAgg+'s legacy workflow; the messages and metrics here stay exactly
Flower's, only the bytes of a repeated model are left out. Works for the Message API and
SecAgg+'s legacy messages alike (any message with one ArrayRecord), with DP and compression
(both act on the weights after they are restored).

Simulation's in-memory grid moves objects in memory; it is left as it is (a simulated site's
``context.state`` lives in the driver's memory, 200 sites would hold 200 models).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

REF = "fedmsk.model-ref"  # ConfigRecord: {"key": the ArrayRecord's key, "hash": its SHA-256}
HELD = "fedmsk.global-model"  # the site's copy in context.state
MISS = "fedmsk model cache miss"  # reason prefix of a site's error reply: send me the full message


def arrays_hash(record: ArrayRecord) -> str:
    """SHA-256 over every array's name, dtype, shape, storage type and bytes, in order."""
    h = hashlib.sha256()
    for name in record:
        arr = record[name]
        h.update(f"{name}\0{arr.dtype}\0{list(arr.shape)}\0{arr.stype}\0{len(arr.data)}\0".encode())
        h.update(arr.data)
    return h.hexdigest()


def _array_key(content: RecordDict) -> str | None:
    keys = [k for k, rec in content.items() if isinstance(rec, ArrayRecord)]
    return keys[0] if len(keys) == 1 else None


class DeliverOnce:
    """A grid's ``send_and_receive`` that leaves out arrays the receiving node already holds."""

    def __init__(self, send: Callable[..., Iterable[Message]]) -> None:
        self.send = send
        self.held: dict[int, str] = {}  # node id -> hash of the arrays it acknowledged last
        self.stripped_bytes = 0  # payload bytes left out so far (bench/bench_wire.py reports them)

    def __call__(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        hashes: dict[int, str] = {}  # id(ArrayRecord) -> hash: a strategy sends one record to every node
        full: dict[int, tuple[Message, RecordDict, str]] = {}  # node -> (message, full content, hash)
        stripped: set[int] = set()
        for msg in messages:
            key = _array_key(msg.content) if msg.has_content() else None
            if key is None:
                continue
            record = msg.content[key]
            digest = hashes.setdefault(id(record), arrays_hash(record))
            node = msg.metadata.dst_node_id
            ref = ConfigRecord({"key": key, "hash": digest})
            content = RecordDict({k: v for k, v in msg.content.items()} | {REF: ref})  # a new dict: strategies share one
            full[node] = (msg, content, digest)
            if self.held.get(node) == digest:
                msg.content = RecordDict({k: v for k, v in content.items() if k != key})
                stripped.add(node)
                self.stripped_bytes += sum(len(record[name].data) for name in record)
            else:
                msg.content = content
        replies = list(self.send(messages, timeout=timeout))
        resend, kept = [], []
        for reply in replies:
            node = reply.metadata.src_node_id
            if node in stripped and reply.has_error() and reply.error.reason.startswith(MISS):
                orig, content, _ = full[node]
                resend.append(Message(content=content, dst_node_id=node, message_type=orig.metadata.message_type,
                                      group_id=orig.metadata.group_id))
                self.held.pop(node, None)
                kept.append(reply)  # answered below, or kept as the reply when the resend gets none
                continue
            self._note(reply, full)
            kept.append(reply)
        if not resend:
            return kept
        again = {r.metadata.src_node_id: r for r in self.send(resend, timeout=timeout)}
        for reply in again.values():
            self._note(reply, full)
        return [again.get(r.metadata.src_node_id, r) if r.has_error() and r.error.reason.startswith(MISS) else r
                for r in kept]

    def _note(self, reply: Message, full: dict[int, tuple[Message, RecordDict, str]]) -> None:
        node = reply.metadata.src_node_id
        if node not in full:
            return
        if reply.has_error():
            self.held.pop(node, None)  # it may or may not hold them: the next message carries them in full
        else:
            self.held[node] = full[node][2]


def deliver_once(grid):  # type: ignore[no-untyped-def]
    """``grid`` with ``DeliverOnce`` around its ``send_and_receive`` when it is Flower's deployment grid."""
    from flwr.superlink.grid.http_grid import HttpGrid

    if isinstance(grid, HttpGrid):
        grid.send_and_receive = DeliverOnce(grid.send_and_receive)  # type: ignore[method-assign]
    return grid


def model_cache_mod(msg: Message, context: Context, call_next) -> Message:  # type: ignore[no-untyped-def]
    """ClientApp mod: keep the arrays of a message marked ``REF``; restore them into one that came without."""
    if not msg.has_content() or REF not in msg.content:
        return call_next(msg, context)
    ref = msg.content[REF]
    key, digest = str(ref["key"]), str(ref["hash"])
    content = RecordDict({k: v for k, v in msg.content.items() if k != REF})
    if key in content:
        if arrays_hash(content[key]) != digest:
            return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION,
                                 reason=f"the arrays received do not match the hash the server sent ({digest[:12]})"),
                           reply_to=msg)
        context.state[HELD] = content[key]
    else:
        held = context.state.array_records.get(HELD)
        have = arrays_hash(held) if held is not None else None
        if have != digest:
            what = "no model kept" if have is None else f"model {have[:12]} kept"
            return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION,
                                 reason=f"{MISS}: the server named model {digest[:12]}, this site has {what}"),
                           reply_to=msg)
        content[key] = held
    msg.content = content
    return call_next(msg, context)
