"""Hospital verb `privacy`: the site's privacy budget, spent per run and round, and what is left,
and beside it every noised release of evaluation counts (client.release) with each split's spend."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from cli.main import EXIT_USAGE, Verb

if TYPE_CHECKING:
    from rich.console import Console


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("site_dir", help="the site folder whose ledger (<site_dir>/.fedmsk/privacy_ledger.json) to read")
    p.add_argument("--policy", help="the site's own privacy policy YAML (default: the policy pinned in the ledger)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from client.ledger import LedgerError, PrivacyLedger
    from client.privacy import budget_report

    console = Console()
    if not Path(args.site_dir).is_dir():
        Console(stderr=True).print(f"[bold red]{args.site_dir}[/] is not a folder; pass the site folder", highlight=False)
        return EXIT_USAGE
    try:
        report = budget_report(args.site_dir, args.policy)
        ledger = PrivacyLedger.load(args.site_dir)
    except LedgerError as exc:
        Console(stderr=True).print(f"[bold red]ledger error:[/] {exc}", highlight=False)
        return EXIT_USAGE  # the site's own file must be fixed before anything can be reported
    report["releases"] = {"entries": [asdict(r) for r in ledger.releases], "splits": ledger.release_totals()}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    if report["policy"] is None and not ledger.releases:
        console.print(f"no private training or noised release recorded at this site yet ({report['ledger']} does not exist)")
        return 0
    if report["policy"] is None:
        console.print("no private training recorded at this site yet (DP-SGD never ran here)")
    else:
        _print_training(console, args.site_dir, report)
    if ledger.releases:
        budget = (report["policy"] or ledger.policy or {}).get("release_budget")  # --policy's, else the pinned one
        _print_releases(console, report["releases"], budget)
    return 0


def _print_training(console: Console, site_dir: str, report: dict) -> None:
    """The DP-SGD spend: the policy line, then epsilon per run and round."""
    from rich.table import Table

    pol = report["policy"]
    console.print(
        f"site {site_dir}: epsilon spent [bold]{report['spent']:.3f}[/] of {pol['target_epsilon']:g}, "
        f"left [bold]{report['left']:.3f}[/] (delta {pol['delta']:g}, {pol['accountant']} accountant, "
        f"max grad norm {pol['max_grad_norm']:g}; {report['steps']} noisy steps)",
        highlight=False,
    )
    table = Table("run", "round", "steps", "noise", "epsilon this round", "epsilon after")
    for run in report["runs"]:
        for r in run["rounds"]:
            table.add_row(run["run_id"], str(r["round"]), str(r["steps"]), f"{r['noise_multiplier']:.3f}",
                          f"{r['epsilon_round']:.3f}", f"{r['epsilon_total']:.3f}")
        table.add_row(f"[bold]{run['run_id']}[/]", "all", str(run["steps"]), "", f"[bold]{run['epsilon']:.3f}[/]", "",
                      end_section=True)
    console.print(table)


def _print_releases(console: Console, releases: dict, budget: float | None) -> None:
    """The noised evaluation releases: one row each, then each split's total (its own patients, its own budget)."""
    from rich.table import Table

    table = Table("run", "round", "split", "mechanism", "noise scale", "sensitivity", "epsilon this release",
                  "split epsilon after", title="released evaluation counts (val/test patients, outside DP-SGD)")
    for r in releases["entries"]:
        table.add_row(r["run_id"], str(r["round"]), r["split"], r["mechanism"], f"{r['noise_scale']:.3f}",
                      f"{r['sensitivity']:g}", f"{r['epsilon']:.3f}", f"{r['epsilon_split_total']:.3f}")
    console.print(table)
    for split, tot in releases["splits"].items():
        of = f" of release_budget {budget:g}" if budget is not None else ""
        delta = f", delta {tot['delta']:g}" if tot["delta"] else ""
        console.print(f"split {split}: {tot['releases']} releases, epsilon spent [bold]{tot['epsilon']:.3f}[/]{of}{delta}",
                      highlight=False)


VERBS = [Verb("privacy", "show this site's differential-privacy budget: epsilon spent per run and round, and what is left",
              _add_arguments, _run, role="site")]
