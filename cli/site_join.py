"""Hospital verbs for a real deployment: `join` and `approve` (work in client/join.py, client/approval.py)."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from rich.console import Console

from cli.main import Verb


def _join_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="the site bundle folder from your coordinator (or its join.yaml)")
    p.add_argument("--data-dir", default=None, help="override site.yaml's data_dir")
    p.add_argument("--device", default=None, help="override site.yaml's device (cpu, cuda, cuda:N)")
    p.add_argument("--runtime-port", type=int, default=None,
                   help="override join.yaml's runtime_port (several sites on one machine need different ports)")
    p.add_argument("--poll-s", type=float, default=None,
                   help="seconds between the SuperNode's pulls when idle (default 0.5; Flower's own: 3; 2-3 for 50+ sites)")
    p.add_argument("--heartbeat-s", type=float, default=None,
                   help="heartbeat the SuperNode declares (default 10, the least Flower accepts; the server drops a site after 2 missed)")
    p.add_argument("--cold-clientapp", action="store_true",
                   help="start a fresh interpreter per message (Flower's own way) instead of forking a warm one (~0.5 GB less)")


def _join(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from client.join import Intervals, SiteNode, load_join

    console = Console()
    settings = load_join(args.bundle)
    intervals = Intervals(warm=not args.cold_clientapp)
    if args.poll_s is not None:
        intervals = replace(intervals, poll_s=args.poll_s)
    if args.heartbeat_s is not None:
        intervals = replace(intervals, heartbeat_s=args.heartbeat_s)
    intervals.check()
    node = SiteNode(settings, data_dir=args.data_dir, device=args.device, runtime_port=args.runtime_port, intervals=intervals)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the children like Ctrl-C does
    node.start()
    console.print(f"site '{settings.site}' joining {settings.superlink}; logs in {node.state_dir / 'logs'}")
    console.print(f"approved app builds: {settings.approved_builds} (add with `fedmsk approve`)")
    code = node.wait()
    reason = node.explain_exit()
    if code and reason:
        console.print(f"[red]{reason}[/]", highlight=False, soft_wrap=True)
    return code


def _approve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("build", help="the app build (.fab) or the app's source folder to approve")
    p.add_argument("--bundle", default=".", help="the site bundle folder (its join.yaml names the allow-list)")
    p.add_argument("--revoke", action="store_true", help="withdraw the approval of this build instead")


def _approve(args: argparse.Namespace) -> int:
    from client.approval import ApprovedBuilds, fab_sha256
    from client.join import load_join

    console = Console()
    store = ApprovedBuilds(load_join(args.bundle).approved_builds)
    if args.revoke:
        digest, _ = fab_sha256(args.build)
        found = store.revoke(digest)
        console.print(f"{'withdrew' if found else 'was not approved:'} sha256={digest}")
        return 0
    entry = store.approve(Path(args.build))
    console.print(f"approved app build sha256={entry.sha256} {entry.fab_id} (from {entry.source})")
    console.print("this site now runs exactly this build; any other build is refused with a log line naming its hash")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


VERBS = [
    Verb("join", "connect this hospital to the federation with its site bundle (SuperNode + approved-build check)", _join_args, _join, "site"),
    Verb("approve", "record the SHA-256 of an app build this site agrees to run", _approve_args, _approve, "site"),
]
