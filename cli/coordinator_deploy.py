"""Coordinator verbs for a real deployment: `certs`, `server`, `launch` (work in server/)."""

from __future__ import annotations

import argparse
import datetime as dt
import signal
import time

from rich.console import Console
from rich.table import Table

from cli.main import Verb

DIR_HELP = "the consortium folder (CA, server certificate, site records, state database)"


def _dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default="consortium", help=f"{DIR_HELP} (default: ./consortium)")


def _certs_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = sub.add_parser("init", help="create the consortium CA and the server's TLS certificate")
    _dir(init)
    init.add_argument("--public-address", required=True, help="HOST:PORT the hospitals connect to (the gateway)")
    init.add_argument("--host", action="append", default=[], help="another name or IP of the server (repeatable)")
    init.add_argument("--force", action="store_true", help="replace an existing consortium (invalidates every bundle)")
    add = sub.add_parser("add-site", help="issue a site's key pair and write its bundle")
    _dir(add)
    add.add_argument("name")
    add.add_argument("--rotate", action="store_true", help="new key pair for an existing (e.g. revoked) site")
    rev = sub.add_parser("revoke", help="unregister a site's key at the running server")
    _dir(rev)
    rev.add_argument("name")
    ls = sub.add_parser("list", help="sites, key fingerprints, registration state, certificate expiry")
    _dir(ls)


def _certs(args: argparse.Namespace) -> int:
    from server.provision import Consortium, ProvisionError
    from server.superlink import flwr_home, node_states, revoke_site, sync_site_keys

    console = Console()
    c = Consortium(args.dir)
    if args.action == "init":
        c.init(args.public_address, args.host, force=args.force)
        console.print(f"consortium CA and server certificate in {c.root} (SANs: {', '.join(c.info().hosts)})")
        console.print(f"next: `fedmsk certs add-site NAME --dir {args.dir}` for each hospital")
    elif args.action == "add-site":
        bundle = c.add_site(args.name, rotate=args.rotate)
        console.print(f"site '{args.name}' key {c.site(args.name).fingerprint}")
        console.print(f"send the folder {bundle} to the hospital over a trusted channel, then delete it here.")
        if (flwr_home(c) / "config.toml").is_file():
            try:  # a running server registers the key now
                for change in sync_site_keys(c, flwr_home(c)):
                    console.print(change)
                return 0
            except ProvisionError:
                pass
        console.print("`fedmsk server` registers the key when it starts.")
    elif args.action == "revoke":
        console.print(revoke_site(c, args.name, flwr_home(c)))
    else:
        c.require()
        try:
            states = node_states(flwr_home(c))
        except Exception:  # server not running: show what the folder records
            states = None
        now = dt.datetime.now(dt.timezone.utc)
        console.print(f"server certificate expires {c.server_cert_expiry():%Y-%m-%d} "
                      f"({(c.server_cert_expiry() - now).days} days); CA expires {c.ca_expiry():%Y-%m-%d}")
        table = Table("site", "key fingerprint", "key gen", "node id", "state")
        for rec in c.sites().values():
            if rec.revoked:
                state = "revoked"
            elif rec.node_id is None:
                state = "not registered yet"
            elif states is None:
                state = "registered (server not running)"
            else:
                state = states.get(rec.node_id, "unknown to the server")
            table.add_row(rec.name, rec.fingerprint, str(rec.key_generation), str(rec.node_id or "-"), state)
        console.print(table)
    return 0


def _server_args(p: argparse.ArgumentParser) -> None:
    _dir(p)
    p.add_argument("--bind", default="0.0.0.0", help="address the site-facing gateway listens on (default: all)")
    p.add_argument("--local-port", type=int, default=9093, help="the SuperLink's own port on 127.0.0.1 (Control API)")
    p.add_argument("--no-gateway", action="store_true",
                   help="do not start nginx (you put your own proxy in front; see README)")


def _server(args: argparse.Namespace) -> int:
    from server.provision import Consortium
    from server.superlink import CoordinatorServer, ServerDied

    console = Console()
    c = Consortium(args.dir)
    srv = CoordinatorServer(c, local_port=args.local_port, bind_host=args.bind, gateway=not args.no_gateway)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the children like Ctrl-C does
    with srv:
        for change in srv.changes:
            console.print(change)
        console.print(f"SuperLink on 127.0.0.1:{args.local_port} (Control API, this machine only); "
                      f"sites connect to {c.info().public_address}")
        console.print(f"Flower CLI: FLWR_HOME={srv.home} flwr ls consortium   |   submit: fedmsk launch --dir {args.dir}")
        try:
            while True:
                for event in srv.supervise():  # a dead SuperLink, executor or gateway is named and restarted
                    console.print(f"[yellow]{event}[/]", highlight=False, soft_wrap=True)
                time.sleep(1)
        except KeyboardInterrupt:
            return 0
        except ServerDied as exc:
            console.print(f"[red]{exc}[/]", highlight=False, soft_wrap=True)
            return 1


def _launch_args(p: argparse.ArgumentParser) -> None:
    _dir(p)
    p.add_argument("--app", default=None, help="the Flower app folder to run (default: this fedmsk installation)")
    p.add_argument("--no-stream", action="store_true", help="do not print the run's log while waiting")
    p.add_argument("--timeout", type=float, default=None,
                   help="stop the run after this many seconds (default: 600 + (2 x rounds + 2) x strategy.round_timeout_s)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for the run, e.g. rounds=10 model=image_only")


def _launch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from server.launch import LaunchError, launch, resume_hint
    from server.provision import Consortium

    console = Console()
    consortium = Consortium(args.dir)
    try:
        result = launch(consortium, args.overrides, app_dir=Path(args.app) if args.app else None,
                        stream=not args.no_stream, timeout_s=args.timeout)
    except LaunchError as exc:
        console.print(f"[red]{exc}[/]", highlight=False, soft_wrap=True)
        return 1
    colour = "green" if result.ok else "red"
    console.print(f"[{colour}]run {result.run_id}: {result.status}[/] (app build {result.fab_hash}); run folder {result.run_dir}",
                  highlight=False, soft_wrap=True)
    if not result.ok:
        if result.reason:
            console.print(f"[red]{result.reason}[/]", highlight=False, soft_wrap=True)
        console.print(f"after fixing the cause: {resume_hint(consortium, args.overrides, result.run_dir, Path(args.app) if args.app else None)}",
                      highlight=False, soft_wrap=True)
    return 0 if result.ok else 1


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


VERBS = [
    Verb("certs", "consortium certificates and site keys: init | add-site NAME | revoke NAME | list", _certs_args, _certs, "coordinator"),
    Verb("server", "start the SuperLink (TLS, site keys, state database) behind the site-facing gateway", _server_args, _server, "coordinator"),
    Verb("launch", "submit a run to the running server and follow it; exits non-zero when the run fails", _launch_args, _launch, "coordinator"),
]
