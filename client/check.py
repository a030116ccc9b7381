"""`fedmsk check`: can this hospital's data take part, and what exactly is wrong with the rest?

Runs the same ``load_site`` a training round runs (so the check cannot pass on data the client
would then reject), decodes every image once (which also warms the site's preprocessing
cache), prints a summary a person reads in ten seconds, and writes a per-record CSV report into
the site folder. The report names patients and files, so it stays at the site: nothing here is
ever sent to the server.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shared.config import TaskConfig
from shared.dicom import syntax_name
from shared.masks import mask_line
from shared.records import RecordIssue
from shared.sitedata import SiteData, load_site

REPORT_NAME = "fedmsk-check-report.csv"
_STAGES = {"headers": "reading DICOM headers", "images": "decoding images"}


@dataclass
class CheckResult:
    site: SiteData
    summary: dict[str, Any]
    report: Path
    ok: bool
    verdict: str  # one line: why the site can or cannot take part


def summarise(site: SiteData, task: TaskConfig) -> dict[str, Any]:
    """The figures the operator needs, from the loaded site alone (no patient-level data)."""
    usable = set(site.patient_ids)
    labelled = {pid for pid, y in zip(site.patient_ids, site.labels) if y >= 0}
    dropped = [i for i in site.issues if not i.kept]
    patients_by_reason = Counter()
    for reason in {i.reason for i in dropped if i.patient_id}:
        patients_by_reason[reason] = len({i.patient_id for i in dropped if i.reason == reason and i.patient_id not in usable})
    headers = site.headers.values()
    return {
        "usable_patients": len(labelled),  # labelled: what task.min_usable counts
        "unlabelled_patients": len(usable - labelled),  # usable images + clinical row, empty label: pretraining only
        "input_rows": len(site.patient_ids),
        "unusable_patients_by_reason": {k: v for k, v in patients_by_reason.most_common() if v},
        "files_by_reason": dict(Counter(i.reason for i in dropped if not i.patient_id).most_common()),
        "notes_by_reason": dict(Counter(i.reason for i in site.issues if i.kept).most_common()),
        "label_balance": {str(c): int((site.labels == c).sum()) for c in task.classes},
        "files_read": len(site.headers),
        "image_sizes": dict(Counter(f"{h['rows']}x{h['columns']}" + (f"x{h['frames']}" if h["frames"] > 1 else "")
                                    for h in headers).most_common(5)),
        "pixel_spacings_mm": dict(Counter("none" if not h["spacing_mm"] else "x".join(f"{v:g}" for v in h["spacing_mm"])
                                          for h in headers).most_common(5)),
        "modalities": dict(Counter(h["modality"] or "?" for h in headers).most_common()),
        "transfer_syntaxes": dict(Counter(syntax_name(h["transfer_syntax"]) for h in headers).most_common()),
        "clinical_problem": site.clinical_problem,
        "missing_values_by_column": {col: sum(by.values()) for col, by in site.clinical_missing.items()},
        "masks": site.masks,  # task.mask_labels set: files/found/missing/unreadable/shape_mismatch/bad_labels
    }


_POLICY = {"drop": "patients left out", "impute": "imputed", "indicator": "imputed + indicator"}


def missing_line(site: SiteData, task: TaskConfig) -> str:
    """'weight_kg 3 (NA 2, empty 1; imputed), age 1 (nan 1; patients left out)' in task column order."""
    parts = []
    for col in task.columns:
        by = site.clinical_missing.get(col.name)
        if by:
            spelled = ", ".join(f"{k} {v}" for k, v in sorted(by.items(), key=lambda kv: -kv[1]))
            parts.append(f"{col.name} {sum(by.values())} ({spelled}; {_POLICY.get(col.missing, col.missing)})")
    return ", ".join(parts) or "none"


def write_report(issues: list[RecordIssue], path: Path) -> None:
    """One row per finding: record, file, reason, used (yes when it removed nothing), detail, action."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["record", "file", "reason", "used", "detail", "action"])
        for i in sorted(issues, key=lambda i: (i.kept, i.reason, i.patient_id, i.file)):
            writer.writerow([i.patient_id, i.file, i.reason, "yes" if i.kept else "no", i.detail, i.action])


def _print_summary(console: Console, site: SiteData, summary: dict[str, Any], task: TaskConfig, verdict: str, ok: bool,
                   report: Path) -> None:
    if site.clinical_problem:  # the cause first: every image is unlinkable because of it
        console.print(f"[bold red]clinical table unusable[/]: {site.clinical_problem}", highlight=False)
    table = Table(title=f"site '{site.name}' for task '{task.name}'", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()

    def counts(d: dict[str, int]) -> str:
        return ", ".join(f"{k}: {v}" for k, v in d.items()) or "-"

    rows = summary["input_rows"]
    table.add_row("usable patients", f"{summary['usable_patients']} labelled (min_usable {task.min_usable}), "
                  f"{summary['unlabelled_patients']} unlabelled (pretraining only)"
                  + (f", {rows} inputs" if rows != summary["usable_patients"] + summary["unlabelled_patients"] else ""))
    table.add_row("label balance", counts(dict(zip(task.class_names or summary["label_balance"], summary["label_balance"].values()))))
    table.add_row("unusable patients", counts(summary["unusable_patients_by_reason"]))
    table.add_row("unusable files", counts(summary["files_by_reason"]))
    table.add_row("notes (kept)", counts(summary["notes_by_reason"]))
    table.add_row("missing clinical values", missing_line(site, task))
    if task.mask_labels:
        table.add_row("masks", mask_line(site.masks))
    table.add_row("files read", str(summary["files_read"]))
    table.add_row("image sizes", counts(summary["image_sizes"]))
    table.add_row("pixel spacing (mm)", counts(summary["pixel_spacings_mm"]))
    table.add_row("modalities", counts(summary["modalities"]))
    table.add_row("transfer syntaxes", counts(summary["transfer_syntaxes"]))
    console.print(table)
    console.print(f"per-record report: {report} (stays at this site)")
    if site.cache_note:
        console.print(f"[yellow]{site.cache_note}[/]: every round will decode the DICOM files again", highlight=False)
    console.print(f"[bold {'green' if ok else 'red'}]{'OK' if ok else 'NOT READY'}[/]: {verdict}", highlight=False)


def check_site(site_dir: str | Path, task: TaskConfig, console: Console | None = None, use_cache: bool = True) -> CheckResult:
    """Load everything with a progress bar, print the summary, write the report; never raises on bad records."""
    console = console or Console()
    root = Path(site_dir)
    with Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(_STAGES.get(stage, stage), total=total)
            bar.update(tasks[stage], completed=done, total=total)

        # unlabelled patients too: their records are checked like the others and counted apart
        site = load_site(root, task, progress=progress, use_cache=use_cache, verify_all=True, labelled_only=False)
    summary = summarise(site, task)
    report = root / REPORT_NAME
    write_report(site.issues, report)
    usable = summary["usable_patients"]
    missing_classes = [c for c, n in summary["label_balance"].items() if n == 0]
    if site.clinical_problem:
        verdict = site.clinical_problem
    elif usable < task.min_usable:
        top = next(iter(summary["unusable_patients_by_reason"] or summary["files_by_reason"]), "no records")
        verdict = f"{usable} usable labelled patients, the task needs at least {task.min_usable} (most common problem: {top})"
    elif missing_classes:
        verdict = f"no usable patients with label {', '.join(missing_classes)}: training needs every class"
    else:
        verdict = f"{usable} usable labelled patients (task needs {task.min_usable})"
    ok = usable >= task.min_usable and not missing_classes
    _print_summary(console, site, summary, task, verdict, ok, report)
    return CheckResult(site, summary, report, ok, verdict)
