"""The clinical table: parse a site's CSV against the task's declared schema, and turn it into features.

Clinical systems export CSVs in whatever encoding, delimiter and spelling they use. The task
config (configs/task/*.yaml) declares every column once: kind, unit, allowed range or accepted
spellings -> code, whether the column must exist, and the missing-value policy. Parsing checks
every cell against that declaration and reports each problem per record (``shared.records``);
it never guesses a spelling or a unit. The model's clinical input (``feature_names``) is
derived from the declaration alone, because the server builds the model before any site data
exists, and ``ClinicalScaler`` fits its statistics on a site's training split only (without DP) or
takes them from the task's declared reference values (under DP).
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared.config import ColumnSpec, TaskConfig
from shared.records import RecordIssue, issue

PATIENT_ID = "patient_id"
# cells that mean "no value" in exports (compared trimmed and case-insensitively)
MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none", "-", "?", "missing", "#n/a"})
_ENCODINGS = ("utf-8-sig", "cp1252", "latin-1")  # latin-1 decodes any byte: the last resort


# ---------------------------------------------------------------- features (config only)
def category_codes(col: ColumnSpec) -> list[float]:
    """The distinct numeric codes of a category column, sorted (several spellings share a code)."""
    return sorted({float(v) for v in col.categories.values()})


def feature_names(task: TaskConfig) -> list[str]:
    """The model's clinical inputs, in order, from the task config alone.

    Feature columns in declaration order (a 2-code category is one 0/1 value; more codes are
    one-hot ``col=code``), then ``<col>_missing`` for each feature column with missing='indicator'.
    """
    names: list[str] = []
    for col in task.columns:
        if not col.feature:
            continue
        codes = category_codes(col) if col.kind == "category" else []
        if len(codes) > 2:
            names.extend(f"{col.name}={code:g}" for code in codes)
        else:
            names.append(col.name)
    names.extend(f"{col.name}_missing" for col in task.columns if col.feature and col.missing == "indicator")
    return names


# ---------------------------------------------------------------- parsing
@dataclass
class ClinicalRow:
    """One usable patient row: raw values in task.columns order (NaN = missing), the label or None."""

    patient_id: str
    values: np.ndarray
    label: int | None
    line: int


@dataclass
class ClinicalTable:
    """The usable rows, the per-record issues, and what the operator must hear first.

    ``problem`` is set when the table as a whole cannot be used (not a CSV, no rows, a required
    column absent): then no image can be linked, and the check names this cause, not the symptom.
    ``missing`` counts the cells read as missing per column, by how they were written.
    """

    rows: dict[str, ClinicalRow]
    issues: list[RecordIssue] = field(default_factory=list)
    encoding: str = ""
    delimiter: str = ""
    problem: str = ""
    missing: dict[str, dict[str, int]] = field(default_factory=dict)


# what the first bytes of a file that is not a text table say it is -> (what it is, what to do)
_NOT_CSV: tuple[tuple[bytes, str, str], ...] = (
    (b"PK\x03\x04", "an Excel workbook (.xlsx, a ZIP file)", "open it in Excel or LibreOffice and save it as CSV (comma separated)"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an Excel 97-2003 workbook (.xls)",
     "open it in Excel or LibreOffice and save it as CSV (comma separated)"),
    (b"%PDF", "a PDF document", "export the table itself as CSV from the clinical system"),
)


def _table_problem(data: bytes, where: str) -> tuple[str, str] | None:
    """(what is wrong with the file as a whole, what to do), or None when it can be read as text."""
    for magic, what, fix in _NOT_CSV:
        if data.startswith(magic):
            return f"{where} is {what}", fix
    if not data.strip():
        return f"{where} is empty ({len(data)} bytes)", "export the patients' table into clinical.csv with a header row"
    if b"\x00" in data[:65536] and not data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return f"{where} is binary data, not a text table", "export the table as CSV (text, comma or semicolon separated)"
    return None


def _decode(data: bytes) -> tuple[str, str]:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # Excel's "Unicode text" export
        return data.decode("utf-16"), "utf-16"
    for enc in _ENCODINGS:
        try:
            return data.decode(enc), enc
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes every byte")  # pragma: no cover


def _sniff_delimiter(text: str) -> str:
    header = next((line for line in text.splitlines() if line.strip()), "")
    try:
        return csv.Sniffer().sniff(header, delimiters=",;\t|").delimiter
    except csv.Error:
        return max(",;\t|", key=header.count)


def parse_number(cell: str, decimal_comma: bool) -> float:
    """A plain number; a decimal comma only where the delimiter is not a comma. ValueError otherwise."""
    text = cell.strip().replace(" ", "")
    if decimal_comma and text.count(",") == 1 and "." not in text:
        text = text.replace(",", ".")
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(cell)
    return value


class _CellError(Exception):
    def __init__(self, reason: str, detail: str, action: str | None = None) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.action = reason, detail, action


def _unit(col: ColumnSpec) -> str:
    return f" {col.unit}" if col.unit else ""


def parse_cell(cell: str, col: ColumnSpec, decimal_comma: bool) -> float:
    """One cell -> its numeric value (category code), NaN when missing; _CellError when invalid."""
    text = cell.strip()
    if text.casefold() in MISSING_TOKENS:
        return math.nan
    if col.kind == "category":
        spellings = {k.strip().casefold(): float(v) for k, v in col.categories.items()}
        if text.casefold() not in spellings:
            accepted = ", ".join(sorted(col.categories))
            raise _CellError("unknown_category", f"{col.name}='{text}' is not an accepted spelling ({accepted})",
                             f"write {col.name} as one of: {accepted} (or add the spelling to the task config)")
        return spellings[text.casefold()]
    try:
        value = parse_number(text, decimal_comma)
    except ValueError:
        raise _CellError("unparseable_value", f"{col.name}='{text}' is not a number") from None
    if col.kind == "int" and value != int(value):
        raise _CellError("unparseable_value", f"{col.name}='{text}' is not a whole number")
    low = -math.inf if col.min is None else col.min
    high = math.inf if col.max is None else col.max
    if not low <= value <= high:
        raise _CellError(
            "out_of_range", f"{col.name}={value:g}{_unit(col)} is outside [{col.min}, {col.max}]{_unit(col)}",
            f"correct {col.name}: expected {col.min}..{col.max}{_unit(col)} (is the unit right?)",
        )
    return value


def parse_label(cell: str | None, task: TaskConfig, decimal_comma: bool) -> int | None:
    """The class label, None when empty; _CellError when it is not one of task.classes."""
    if cell is None or cell.strip().casefold() in MISSING_TOKENS:
        return None
    try:
        value = parse_number(cell, decimal_comma)
    except ValueError:
        value = math.nan
    accepted = sorted(task.label_map) if task.label_map else task.classes
    if not math.isfinite(value) or value != int(value) or int(value) not in accepted:
        raise _CellError("label_not_in_classes", f"{task.label_column}='{cell.strip()}' is not one of {accepted}")
    return int(task.label_map.get(int(value), int(value)))


def read_table(path: str | Path, task: TaskConfig) -> ClinicalTable:
    """Parse clinical.csv; every row that cannot be used is an issue, never an exception."""
    p = Path(path)
    where = p.name  # records read "clinical.csv:LINE": the report lives in the site folder itself
    try:
        data = p.read_bytes()
    except OSError as exc:
        detail = f"{where} cannot be read: {exc.strerror or exc}"
        return ClinicalTable({}, [issue("clinical_csv_unreadable", file=where, detail=detail)], problem=detail)
    if bad := _table_problem(data, where):
        return ClinicalTable({}, [issue("clinical_csv_unreadable", file=where, detail=bad[0], action=bad[1])],
                             problem=f"{bad[0]}; {bad[1]}")
    try:
        return _parse(data, where, task)
    except csv.Error as exc:  # e.g. a field larger than the csv module's limit
        detail = f"{where} cannot be parsed as CSV ({exc})"
        return ClinicalTable({}, [issue("clinical_csv_unreadable", file=where, detail=detail)], problem=detail)


def _parse(data: bytes, where: str, task: TaskConfig) -> ClinicalTable:
    text, encoding = _decode(data)
    delimiter = _sniff_delimiter(text)
    reader = csv.reader(io.StringIO(text.replace("\x00", ""), newline=""), delimiter=delimiter)
    header = next(reader, None)
    table = ClinicalTable({}, [], encoding, delimiter)
    norm_header = [h.strip().casefold() for h in header or []]
    if PATIENT_ID not in norm_header:
        table.problem = f"{where} has no '{PATIENT_ID}' column (header read as {encoding}, delimiter {delimiter!r}: {header})"
        table.issues.append(issue("clinical_csv_unreadable", file=where, detail=table.problem))
        return table
    index = {name: i for i, name in reversed(list(enumerate(norm_header)))}  # first occurrence wins
    fatal = False
    for col in task.columns:
        if col.name.casefold() not in index:
            fatal |= col.required
            table.issues.append(issue("missing_column", file=where, kept=not col.required,
                                      detail=f"column '{col.name}' ({'required' if col.required else 'optional: treated as missing'}) is absent"))
    if task.label_column.casefold() not in index:
        fatal = True
        table.issues.append(issue("missing_column", file=where, detail=f"label column '{task.label_column}' is absent"))
    if fatal:
        absent = [f"column '{c.name}'" for c in task.columns if c.required and c.name.casefold() not in index]
        if task.label_column.casefold() not in index:
            absent.append(f"label column '{task.label_column}'")
        table.problem = (f"{where} has no {' and no '.join(absent)} (header: {', '.join(h.strip() for h in header or [])}); "
                         f"add {'it' if len(absent) == 1 else 'them'} under the name the task declares")
        return table

    decimal_comma = delimiter != ","
    parsed: dict[str, list[tuple[ClinicalRow, list[RecordIssue]]]] = defaultdict(list)
    data_lines = 0
    for line_no, cells in enumerate(reader, start=2):
        if not any(c.strip() for c in cells):
            continue
        data_lines += 1
        get = lambda name: cells[index[name.casefold()]] if index[name.casefold()] < len(cells) else ""  # noqa: E731
        pid = get(PATIENT_ID).strip()
        rec = f"{where}:{line_no}"
        if not pid:
            table.issues.append(issue("missing_patient_id", file=rec))
            continue
        problems: list[RecordIssue] = []
        values = np.full(len(task.columns), np.nan, dtype=np.float32)
        for j, col in enumerate(task.columns):
            if col.name.casefold() not in index:
                continue
            try:
                values[j] = parse_cell(get(col.name), col, decimal_comma)
            except _CellError as err:
                problems.append(issue(err.reason, pid, rec, err.detail, err.action))
                continue
            if math.isnan(values[j]):
                written = get(col.name).strip()
                counts = table.missing.setdefault(col.name, {})
                counts[written or "empty"] = counts.get(written or "empty", 0) + 1
                if col.missing == "drop":
                    how = f"written '{written}'" if written else "empty cell"
                    problems.append(issue("missing_required_value", pid, rec, f"{col.name} is missing ({how})"))
        try:
            label = parse_label(get(task.label_column), task, decimal_comma)
        except _CellError as err:
            problems.append(issue(err.reason, pid, rec, err.detail))
            label = None
        parsed[pid].append((ClinicalRow(pid, values, label, line_no), problems))
    if not data_lines:
        table.problem = f"{where} has a header but no patient rows; export the patients' rows with it"
        table.issues.append(issue("clinical_csv_empty", file=where, detail=table.problem))

    for pid, entries in parsed.items():
        first, first_problems = entries[0]
        if len(entries) > 1:
            lines = ", ".join(str(r.line) for r, _ in entries)
            same = all(np.array_equal(r.values, first.values, equal_nan=True) and r.label == first.label
                       for r, _ in entries[1:])
            if not same:
                table.issues.extend(issue("duplicate_patient_conflict", pid, f"{where}:{r.line}",
                                          f"patient_id '{pid}' on lines {lines} with different values") for r, _ in entries)
                continue
            table.issues.extend(issue("duplicate_patient_identical", pid, f"{where}:{r.line}",
                                      f"same as line {first.line}", kept=not first_problems) for r, _ in entries[1:])
        if first_problems:
            table.issues.extend(first_problems)
            continue
        table.rows[pid] = first
    return table


# ---------------------------------------------------------------- features from raw values
class ClinicalScaler:
    """Raw clinical values -> the model's feature vector (``feature_names`` order).

    Imputation, missing indicators, category encoding, then standardisation of numeric columns.
    Two ways to get the statistics:

    * ``fit(rows)``: median (most frequent code for categories), mean and SD of the rows passed,
      the site's training split, so validation and test rows never leak into them. Every
      training patient then shifts every other patient's inputs, so this is for training
      without DP only.
    * ``from_reference()``: from the task config alone (``ref_mean``/``ref_sd`` of a column, else
      the centre of its declared [min, max] and a quarter of its width; categories impute their
      lowest code). No patient's record moves another's inputs: what DP-SGD needs, since its
      guarantee is per patient only if each patient's gradient depends on that patient alone.
    """

    def __init__(self, task: TaskConfig) -> None:
        self.task = task
        self.fill: np.ndarray | None = None
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    def from_reference(self) -> ClinicalScaler:
        """Statistics from the task's declared reference values and ranges only (no patient data)."""
        fill = np.zeros(len(self.task.columns), dtype=np.float64)
        mean: list[float] = []
        std: list[float] = []
        for j, col in enumerate(self.task.columns):
            if col.kind == "category":
                fill[j] = category_codes(col)[0]
                if col.feature:
                    width = len(category_codes(col)) if len(category_codes(col)) > 2 else 1
                    mean.extend([0.0] * width)
                    std.extend([1.0] * width)
                continue
            centre, spread = col.ref_mean, col.ref_sd
            if not col.feature and (centre is None or col.missing == "drop"):
                continue  # read and validated, never a model input: nothing to scale
            if centre is None or spread is None:
                if col.min is None or col.max is None:
                    raise ValueError(
                        f"task column '{col.name}': scaling under DP needs ref_mean and ref_sd, or both min and max, "
                        f"in the task config (a statistic fitted on the private training split would couple patients)"
                    )
                centre = (col.min + col.max) / 2 if centre is None else centre
                spread = (col.max - col.min) / 4 if spread is None else spread
            fill[j] = centre
            if col.feature:
                mean.append(centre)
                std.append(spread if spread > 1e-8 else 1.0)
        indicators = sum(1 for col in self.task.columns if col.feature and col.missing == "indicator")
        self.fill = fill
        self.mean = np.array(mean + [0.0] * indicators)
        self.std = np.array(std + [1.0] * indicators)
        return self

    def fit(self, raw: np.ndarray) -> ClinicalScaler:
        fill = np.zeros(len(self.task.columns), dtype=np.float64)
        for j, col in enumerate(self.task.columns):
            seen = raw[:, j][~np.isnan(raw[:, j])] if len(raw) else np.empty(0)
            if col.kind == "category":
                codes, counts = np.unique(seen, return_counts=True)
                fill[j] = codes[np.argmax(counts)] if len(codes) else category_codes(col)[0]
            else:
                fill[j] = float(np.median(seen)) if len(seen) else 0.0
        self.fill = fill
        encoded = self._encode(raw)
        numeric = self._numeric_mask()
        self.mean = np.where(numeric, encoded.mean(axis=0) if len(raw) else 0.0, 0.0)
        std = encoded.std(axis=0) if len(raw) else np.ones(encoded.shape[1])
        self.std = np.where(numeric & (std > 1e-8), std, 1.0)
        return self

    def _numeric_mask(self) -> np.ndarray:
        mask: list[bool] = []
        for col in self.task.columns:
            if col.feature:
                width = len(category_codes(col)) if col.kind == "category" and len(category_codes(col)) > 2 else 1
                mask.extend([col.kind != "category"] * width)
        mask.extend(False for col in self.task.columns if col.feature and col.missing == "indicator")
        return np.array(mask, dtype=bool)

    def _encode(self, raw: np.ndarray) -> np.ndarray:
        assert self.fill is not None, "ClinicalScaler.fit first"
        filled = np.where(np.isnan(raw), self.fill[None, :], raw)
        parts: list[np.ndarray] = []
        for j, col in enumerate(self.task.columns):
            if not col.feature:
                continue
            if col.kind == "category":
                codes = category_codes(col)
                if len(codes) > 2:
                    parts.extend((filled[:, j] == code).astype(np.float64) for code in codes)
                else:
                    parts.append((filled[:, j] == codes[-1]).astype(np.float64))
            else:
                parts.append(filled[:, j].astype(np.float64))
        parts.extend(np.isnan(raw[:, j]).astype(np.float64)
                     for j, col in enumerate(self.task.columns) if col.feature and col.missing == "indicator")
        return np.stack(parts, axis=1) if parts else np.zeros((len(raw), 0))

    def transform(self, raw: np.ndarray) -> np.ndarray:
        assert self.mean is not None and self.std is not None, "ClinicalScaler.fit first"
        return ((self._encode(raw) - self.mean) / self.std).astype(np.float32)
