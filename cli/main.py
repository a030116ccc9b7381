"""The `fedmsk` command: one verb per module in this package.

Each module ``cli/<name>.py`` that defines ``VERBS`` (a list of ``Verb``) contributes its verbs;
the dispatcher discovers them, so adding a verb never edits a shared if/else chain. Verbs that
take a config accept Hydra overrides as trailing ``key=value`` words.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console


@dataclass(frozen=True)
class Verb:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    role: str = "researcher"  # site | coordinator | researcher: groups the help text


def discover() -> dict[str, Verb]:
    import cli

    verbs: dict[str, Verb] = {}
    for mod in pkgutil.iter_modules(cli.__path__):
        if mod.name == "main":
            continue
        module = importlib.import_module(f"cli.{mod.name}")
        for verb in getattr(module, "VERBS", []):
            if verb.name in verbs:
                raise RuntimeError(f"verb '{verb.name}' defined twice (cli/{mod.name}.py)")
            verbs[verb.name] = verb
    return verbs


def build_parser(verbs: dict[str, Verb]) -> argparse.ArgumentParser:
    roles = {"site": "hospital operator", "coordinator": "consortium coordinator", "researcher": "developer / researcher"}
    epilog = "\n".join(
        f"{label}: " + ", ".join(sorted(v.name for v in verbs.values() if v.role == role))
        for role, label in roles.items()
    )
    parser = argparse.ArgumentParser(
        prog="fedmsk",
        description="Federated multimodal screening for musculoskeletal disease.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in sorted(verbs.values(), key=lambda v: v.name):
        p = sub.add_parser(verb.name, help=verb.help, description=verb.help)
        verb.add_arguments(p)
        p.set_defaults(_run=verb.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from shared.config import ConfigError

    verbs = discover()
    args = build_parser(verbs).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except ConfigError as exc:
        Console(stderr=True).print(f"[bold red]config error:[/] {exc}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
