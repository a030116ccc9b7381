"""Flower's SuperNode with the site's own poll and heartbeat intervals.

``fedmsk join`` starts ``python -m client.supernode --poll-s P --reply-poll-s R --heartbeat-s H
<flower-supernode arguments>``: Flower's own ``flower-supernode`` entry point, with three
intervals that Flower 1.41 hard-codes (read in ``flwr/supernode/start_client_internal.py`` and
``flwr/supernode/fleet_http_connection.py``; none has a flag or an environment variable):

- ``time.sleep(3)`` between two pulls from the SuperLink when no message is waiting. A message
  the server sends waits up to this long before the site sees it, twice a round (train, then
  evaluate). ``--poll-s`` (fedmsk: 0.5 s) costs one small signed request per interval per site
  through the gateway; 50 idle sites at 0.5 s are 100 requests a second at the SuperLink.
- ``time.sleep(0.5)`` while waiting for the ClientApp's reply, in the SuperNode's own process
  (no network): ``--reply-poll-s`` (fedmsk: 0.1 s).
- the heartbeat interval the SuperNode declares (30 s): the SuperLink declares a site gone after
  two missed heartbeats, so a site that died mid-round holds the round for about 60 s.
  ``--heartbeat-s`` (fedmsk: 10 s, the least the SuperLink accepts) makes it about 20 s, for one
  heartbeat every 4 s per site instead of every 20 s. Heartbeats come from a thread of the
  SuperNode process, which never trains, so a busy site does not miss them.

Flower is pinned (``flwr==1.41.0``); ``check_flower_constants`` fails loudly when the source
no longer has the constants this module overrides (``tests/test_deploy_federation.py`` runs it).
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from types import SimpleNamespace

POLL_S = 0.5
REPLY_POLL_S = 0.1
HEARTBEAT_S = 10.0
FLOWER_IDLE_POLL_S = 3.0  # Flower 1.41's own values
FLOWER_REPLY_POLL_S = 0.5


def check_flower_constants() -> None:
    """Raise if Flower's SuperNode no longer sleeps / declares heartbeats as this module assumes."""
    import flwr.supernode.fleet_http_connection as fleet
    import flwr.supernode.start_client_internal as loop

    source = inspect.getsource(loop)
    if "time.sleep(3)" not in source or "time.sleep(0.5)" not in source:
        raise RuntimeError("flwr.supernode.start_client_internal no longer sleeps 3 s / 0.5 s: review client/supernode.py")
    if "heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL" not in inspect.getsource(fleet):
        raise RuntimeError("flwr.supernode.fleet_http_connection no longer declares HEARTBEAT_DEFAULT_INTERVAL: review client/supernode.py")


def _clock(poll_s: float, reply_poll_s: float) -> SimpleNamespace:
    """``time`` for Flower's SuperNode loop, with its two fixed sleeps replaced."""

    def sleep(seconds: float) -> None:
        if seconds == FLOWER_IDLE_POLL_S:
            seconds = poll_s
        elif seconds == FLOWER_REPLY_POLL_S:
            seconds = reply_poll_s
        time.sleep(seconds)

    return SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("__") and name != "sleep"}, sleep=sleep)


def apply_intervals(poll_s: float, reply_poll_s: float, heartbeat_s: float) -> None:
    """Set the three intervals in Flower's SuperNode modules (before the SuperNode starts)."""
    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.fleet_http_connection as fleet
    import flwr.supernode.start_client_internal as loop
    from flwr.common.constant import HEARTBEAT_MAX_INTERVAL, HEARTBEAT_MIN_INTERVAL

    check_flower_constants()
    if not HEARTBEAT_MIN_INTERVAL <= heartbeat_s <= HEARTBEAT_MAX_INTERVAL:
        raise ValueError(f"--heartbeat-s {heartbeat_s}: the SuperLink accepts {HEARTBEAT_MIN_INTERVAL}-{HEARTBEAT_MAX_INTERVAL} s")
    if poll_s <= 0 or reply_poll_s <= 0:
        raise ValueError("--poll-s and --reply-poll-s must be positive")
    loop.time = _clock(poll_s, reply_poll_s)
    fleet.HEARTBEAT_DEFAULT_INTERVAL = heartbeat_s  # what the SuperNode declares
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = heartbeat_s  # how often its sender thread sends


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m client.supernode", description=__doc__.splitlines()[0])
    parser.add_argument("--poll-s", type=float, default=POLL_S)
    parser.add_argument("--reply-poll-s", type=float, default=REPLY_POLL_S)
    parser.add_argument("--heartbeat-s", type=float, default=HEARTBEAT_S)
    args, flower_args = parser.parse_known_args(argv)
    apply_intervals(args.poll_s, args.reply_poll_s, args.heartbeat_s)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":
    main()
