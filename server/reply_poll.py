"""How often the coordinator's ServerApp asks the SuperLink for the sites' replies.

Flower 1.41's deployment grid (``flwr/superlink/grid/http_grid.py``, ``HttpGrid.send_and_receive``)
sleeps a fixed 3 s between two pulls, so every exchange (a round's training, its evaluation)
ends up to 3 s after the last site replied; there is no setting for it. The ServerApp is
fedmsk's own, so ``quick_replies`` gives the grid it receives a ``send_and_receive`` built from
the grid's public ``push_messages`` / ``pull_messages`` with ``federation.reply_poll_s`` between
pulls. A pull is one request on the coordinator's own machine (ServerApp to SuperLink, not
through the gateway), answered from the state database: at 0.2 s that is 5 small reads a
second while a round waits, whatever the number of sites.

With ``pack`` (every run but SecAgg+, whose legacy messages the sites' SecAgg+ client reads
array by array), the messages sent are packed into one array each and the replies unpacked
(shared/packing.py): Flower moves every array as its own request, and that, not the bytes, was
most of a round.

Simulation's in-memory grid moves objects in memory and pulls every 0.1 s (``InMemoryGrid.pull_interval``):
a pull there is a look-up in the driver's own dict, so ``quick_replies`` sets it to ``IN_MEMORY_POLL_S``.
With two exchanges a round, the 0.1 s cost 0.1 s a round on average (10 sites x 10 rounds here: about 1 s
of a 25 s run). Flower's simulation engine also hands messages to its workers every 0.1 s
(``vce_api.add_messages_to_queue``, hard-coded); that wait is Flower's and stays.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from shared.packing import pack_content, unpack_content


IN_MEMORY_POLL_S = 0.01


def quick_replies(grid: Grid, poll_s: float, pack: bool = False) -> Grid:
    """``grid``, pulling replies every ``poll_s`` seconds when it is Flower's deployment grid
    (``pack``: one array per message each way), every ``IN_MEMORY_POLL_S`` when it is simulation's."""
    from flwr.superlink.grid.http_grid import HttpGrid
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    if isinstance(grid, InMemoryGrid):
        grid.pull_interval = min(grid.pull_interval, IN_MEMORY_POLL_S)
        return grid
    if not isinstance(grid, HttpGrid):
        return grid

    def send_and_receive(messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        # Flower's own loop (HttpGrid.send_and_receive), with the pause between pulls chosen here
        messages = list(messages)
        if pack:
            for msg in messages:
                if msg.has_content():
                    msg.content = pack_content(msg.content)
        pending = set(grid.push_messages(messages))
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while timeout is None or time.time() < end:
            got = list(grid.pull_messages(pending))
            if pack:
                for reply in got:
                    if reply.has_content():
                        reply.content = unpack_content(reply.content)
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending:
                break
            time.sleep(poll_s)
        return replies

    grid.send_and_receive = send_and_receive  # type: ignore[method-assign]
    return grid
