"""The synthetic ground truth: what the best possible model would score.

`fedmsk synth` writes each patient's latent disease score to ``<data_root>/oracle.csv``
(outside the site folders, so no site loader and no training code ever sees it). Reports put
a model's AUC beside the oracle AUC on the same test patients: the gap says how much signal
the model leaves on the table, which a bare AUC cannot.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

from sklearn.metrics import roc_auc_score

from simulation.synth import ORACLE_FILE

OracleKey = tuple[str, str]  # (site, patient_id)
ORACLE_COLUMNS = ("site", "patient_id", "latent_score", "label")  # what `fedmsk synth` writes


class OracleError(ValueError):
    """``<data_root>/oracle.csv`` exists but is not the file `fedmsk synth` writes."""


def read_oracle(data_root: str | Path) -> dict[OracleKey, tuple[float, int]]:
    """(site, patient_id) -> (latent_score, label) from ``<data_root>/oracle.csv``; OracleError if it is another file."""
    path = Path(data_root) / ORACLE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: the oracle exists only for federations written by `fedmsk synth`"
        )
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            absent = [c for c in ORACLE_COLUMNS if c not in (reader.fieldnames or [])]
            if absent:
                raise OracleError(f"{path} has columns {reader.fieldnames}, not the {list(ORACLE_COLUMNS)} "
                                  f"`fedmsk synth` writes (missing {absent})")
            out: dict[OracleKey, tuple[float, int]] = {}
            for line, row in enumerate(reader, start=2):
                try:
                    out[(row["site"], row["patient_id"])] = (float(row["latent_score"]), int(row["label"]))
                except (TypeError, ValueError):
                    raise OracleError(f"{path}:{line}: latent_score '{row['latent_score']}' / label '{row['label']}' "
                                      f"is not a number") from None
            return out
    except (UnicodeDecodeError, csv.Error) as exc:
        raise OracleError(f"{path} is not a readable CSV ({exc})") from None


def oracle_problem(data_root: str | Path, patients: Iterable[OracleKey]) -> str | None:
    """Why ``<data_root>/oracle.csv`` cannot give the oracle AUC for these patients, or None when it can.

    Checked when a run starts, so that a researcher's own file of that name costs the oracle column
    (said at once), never the finished run. An absent file is not a problem: real data has no oracle.
    """
    if not (Path(data_root) / ORACLE_FILE).is_file():
        return None
    try:
        oracle = read_oracle(data_root)
    except OracleError as exc:
        return str(exc)
    unknown = sorted(set(patients) - set(oracle))
    if unknown:
        return (f"{Path(data_root) / ORACLE_FILE} does not know {len(unknown)} of the sites' patients "
                f"(e.g. {unknown[0]}): it belongs to another federation")
    return None


def oracle_auc(data_root: str | Path, keys: Iterable[OracleKey]) -> float:
    """AUC of the latent score against the label over the given patients (e.g. the test split).

    A label above 0 is positive: for a graded task this is the screening AUC (any fracture).

    Returns NaN when the patients hold a single class, where an AUC is undefined.
    """
    oracle = read_oracle(data_root)
    wanted = list(keys)
    missing = [k for k in wanted if k not in oracle]
    if missing:
        raise KeyError(f"{len(missing)} patients not in {Path(data_root) / ORACLE_FILE}, e.g. {missing[0]}")
    scores = [oracle[k][0] for k in wanted]
    labels = [int(oracle[k][1] > 0) for k in wanted]  # a graded label (Genant 0-3): screening, grade >= 1
    if len(set(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def oracle_grading(data_root: str | Path, keys: Iterable[OracleKey]) -> dict[str, float]:
    """Macro-F1 and per-grade F1 of the generator's grade of the true value (``oracle_grade``)
    against the label, for generators that write one (graded tasks); {} otherwise."""
    from sklearn.metrics import f1_score

    path = Path(data_root) / ORACLE_FILE
    with path.open(newline="") as fh:
        rows = {(r["site"], r["patient_id"]): r for r in csv.DictReader(fh)}
    wanted = [rows[k] for k in keys if k in rows]
    if not wanted or "oracle_grade" not in wanted[0]:
        return {}
    labels = [int(r["label"]) for r in wanted]
    grades = [int(r["oracle_grade"]) for r in wanted]
    classes = sorted(set(labels) | set(grades))
    per_class = f1_score(labels, grades, labels=classes, average=None, zero_division=0)
    return {"oracle_f1": float(per_class.mean())} | {f"oracle_f1_class{c}": float(v) for c, v in zip(classes, per_class)}
