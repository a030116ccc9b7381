"""Hospital verb `privacy`: the site's privacy budget, spent per run and round, and what is left."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cli.main import EXIT_USAGE, Verb


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("site_dir", help="the site folder whose ledger (<site_dir>/.fedmsk/privacy_ledger.json) to read")
    p.add_argument("--policy", help="the site's own privacy policy YAML (default: the policy pinned in the ledger)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from client.ledger import LedgerError
    from client.privacy import budget_report

    console = Console()
    if not Path(args.site_dir).is_dir():
        Console(stderr=True).print(f"[bold red]{args.site_dir}[/] is not a folder; pass the site folder", highlight=False)
        return EXIT_USAGE
    try:
        report = budget_report(args.site_dir, args.policy)
    except LedgerError as exc:
        Console(stderr=True).print(f"[bold red]ledger error:[/] {exc}", highlight=False)
        return EXIT_USAGE  # the site's own file must be fixed before anything can be reported
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    if report["policy"] is None:
        console.print(f"no private training recorded at this site yet ({report['ledger']} does not exist)")
        return 0
    pol = report["policy"]
    console.print(
        f"site {args.site_dir}: epsilon spent [bold]{report['spent']:.3f}[/] of {pol['target_epsilon']:g}, "
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
    return 0


VERBS = [Verb("privacy", "show this site's differential-privacy budget: epsilon spent per run and round, and what is left",
              _add_arguments, _run, role="site")]
