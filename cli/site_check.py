"""Hospital verb `check`: is this site's data usable for the task? (work in client/check.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.main import EXIT_NOT_READY, EXIT_OK, EXIT_USAGE, Verb


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("site_dir", help="the site folder: clinical.csv + images/ (+ optional manifest.csv)")
    p.add_argument("--no-cache", action="store_true", help="decode everything without reading or writing <site>/.fedmsk-cache")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. task=sarcopenia task.min_usable=50")


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from client.check import check_site
    from shared.config import compose

    cfg = compose(args.overrides)
    root = Path(args.site_dir)
    if not (root / "clinical.csv").is_file():
        Console(stderr=True).print(
            f"[bold red]{root}[/] is not a site folder: it has no clinical.csv "
            "(a site folder holds clinical.csv, images/ and optionally manifest.csv)", highlight=False)
        return EXIT_USAGE
    return EXIT_OK if check_site(root, cfg.task, use_cache=not args.no_cache).ok else EXIT_NOT_READY


VERBS = [Verb("check", "check a site's DICOM + clinical data against the task; writes a per-record report",
              _add_arguments, _run, role="site")]
