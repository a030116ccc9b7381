"""A Flower Grid that delivers messages to the real ClientApp functions in this process.

Flower's simulation engine needs Ray and ~20 s to start; the round-loop tests (poisoned
updates, resume) need the real message flow but not separate processes. Replies can be
tampered with per site through ``tamper`` to play a malicious or broken hospital. ``names``
plays the coordinator's registry: the name each node's key was registered under, which a real
SuperLink returns in ``get_nodes()`` (NodeInfo.name).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=no-name-in-module
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

import client.app as client_app
from shared.model_cache import model_cache_mod


class InProcessGrid(Grid):
    def __init__(self, node_configs: dict[int, dict], tamper: Callable[[int, Message], Message] | None = None,
                 names: dict[int, str] | None = None):
        self.names = names or {}
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = 0
        TaskIdentity.task_id = 0
        self.node_configs = node_configs
        self.tamper = tamper or (lambda node, reply: reply)
        self.sent: list[Message] = []
        self.states: dict[int, RecordDict] = {}  # each node's context.state, kept between messages as a SuperNode does

    def set_run(self, run):  # pragma: no cover - not used by fedmsk's loop
        pass

    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_configs)

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [NodeInfo(node_id=n, name=self.names.get(n, "")) for n in self.node_configs]

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            state = self.states.setdefault(node, RecordDict())
            ctx = Context(run_id=1, node_id=node, node_config=self.node_configs[node], state=state, run_config={})
            kind = msg.metadata.message_type
            handler = client_app.train if kind == "train" else client_app.app if kind.startswith("query") else client_app.evaluate_fn
            try:
                reply = model_cache_mod(msg, ctx, handler)  # as client.secagg_app's app does (shared.model_cache)
            except Exception as exc:  # what Flower turns into an error reply, in Flower's format
                reply = Message(Error(code=2, reason=str(type(exc)) + ":<'" + str(exc) + "'>"), reply_to=msg)
            replies.append(self.tamper(node, reply))
        return replies
