"""The `fedmsk` command: one verb per module in this package.

Each module ``cli/<name>.py`` that defines ``VERBS`` (a list of ``Verb``) contributes its verbs;
the dispatcher discovers them, so adding a verb never edits a shared if/else chain. Verbs that
take a config accept Hydra overrides as trailing ``key=value`` words.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import os
import pkgutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

# Flower posts a telemetry event to telemetry.flower.ai when run_simulation starts and ends (read once,
# when flwr is first imported: flwr/supercore/telemetry.py). Nothing of a fedmsk run phones home: the
# processes fedmsk starts get it off through server.superlink.quiet_flower_env, the verbs' own process here.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

# exit codes of every verb (README "Exit codes"); a verb returns 0 or 1, main maps the rest
EXIT_OK = 0  # ready / the run completed
EXIT_NOT_READY = 1  # the verb did its job and the answer is no: site not ready, run failed, no site trained
EXIT_USAGE = 2  # wrong arguments, config or operator file: nothing was started
EXIT_INTERNAL = 3  # a bug in fedmsk: one line on stderr, the traceback in a file
EXIT_CODES = {EXIT_OK: "ready / completed", EXIT_NOT_READY: "not ready / the run failed",
              EXIT_USAGE: "usage or config error", EXIT_INTERNAL: "internal error (traceback written to a file)"}


@dataclass(frozen=True)
class Verb:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    role: str = "researcher"  # site | coordinator | researcher: groups the help text


# packages that register config checks (model and loss names, DP safety of the aux loss, strategy
# settings; see shared.config.register_check): a verb that trains imports them before it composes
TRAINING_CHECKS = ("shared.models", "shared.losses", "shared.ssl", "server.strategy")


def load_training_checks() -> None:
    """Import the owners of the training config checks, so compose() runs them (costs torch + Flower)."""
    for module in TRAINING_CHECKS:
        importlib.import_module(module)


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
    ) + "\n\nexit codes: " + ", ".join(f"{code} {what}" for code, what in EXIT_CODES.items())
    parser = argparse.ArgumentParser(
        prog="fedmsk",
        description="Federated multimodal screening for musculoskeletal disease.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    exit_help = "exit codes: " + ", ".join(f"{code} {what}" for code, what in EXIT_CODES.items())
    for verb in sorted(verbs.values(), key=lambda v: v.name):
        p = sub.add_parser(verb.name, help=verb.help, description=verb.help, epilog=exit_help,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        verb.add_arguments(p)
        p.set_defaults(_run=verb.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one verb and map its outcome to the documented exit codes (``EXIT_CODES``).

    As the `fedmsk` command (``argv`` None), the process freezes the garbage collector's objects
    once every exit handler has run: Python's final collection at exit then skips torch's, MONAI's
    and Flower's module objects, which the OS frees anyway (measured here: exit 1.1 s -> 0.2 s after
    a run; files are closed and logs flushed before, by the handlers and the verbs themselves).
    """
    from shared.config import ConfigError

    verb = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), "")
    if argv is None:  # the `fedmsk` command's own process (callers in Python pass argv)
        atexit.register(gc.freeze)  # registered first, so it runs last: after every other exit handler
    try:
        verbs = discover()
        args = build_parser(verbs).parse_args(argv)  # a usage error exits 2 here (argparse)
        return int(args._run(args) or 0)
    except ConfigError as exc:
        Console(stderr=True).print(f"[bold red]config error:[/] {escape(str(exc))}", highlight=False)
        return EXIT_USAGE
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted", highlight=False)
        return 130
    except Exception as exc:  # noqa: BLE001 -- an operator gets one line and a file, never a raw traceback
        where = write_traceback(verb)
        Console(stderr=True).print(
            f"[bold red]internal error[/] in fedmsk {escape(verb)}: {type(exc).__name__}: {escape(_one_line(exc))}; "
            f"the traceback is in {where} (send it to the fedmsk maintainers; it may name local files)",
            highlight=False, soft_wrap=True)  # one line, whatever the terminal width
        return EXIT_INTERNAL


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: text.rfind(" ", 0, limit)] + " …"


def crash_dir() -> Path:
    """Where tracebacks go: $FEDMSK_CRASH_DIR, else ~/.local/state/fedmsk (on this machine only)."""
    env = os.environ.get("FEDMSK_CRASH_DIR")
    return Path(env) if env else Path.home() / ".local" / "state" / "fedmsk"


def write_traceback(verb: str) -> Path:
    """Write the current exception's traceback to a new file and return its path (temp dir if needed)."""
    name = f"crash-{verb or 'fedmsk'}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    text = f"fedmsk {' '.join(sys.argv[1:])}\n{traceback.format_exc()}"
    for folder in (crash_dir(), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
            return folder / name
        except OSError:
            continue
    return Path("(not written: no writable folder)")


if __name__ == "__main__":
    sys.exit(main())
