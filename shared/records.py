"""Per-record findings of data intake: one closed vocabulary of reasons, each with its fix.

A hospital operator reads these in the `fedmsk check` report, so every reason that intake can
give is listed here once, with the action that resolves it; loaders only add the detail (which
column, which value, which tag). Keeping the vocabulary closed lets the check summary count
records by reason and lets tests assert the exact reason a malformed record gets.
"""

from __future__ import annotations

from dataclasses import dataclass

# reason -> what the operator should do about it (the default action; loaders may be more precise)
REASONS: dict[str, str] = {
    # clinical table, whole file
    "clinical_csv_unreadable": "export clinical.csv as a CSV file (UTF-8, comma or semicolon separated) with a header row",
    "clinical_csv_empty": "export the patients' rows into clinical.csv: it has a header but no data rows",
    "missing_column": "add the column to clinical.csv under the name the task config declares",
    # clinical table, per row
    "missing_patient_id": "fill in patient_id for this row",
    "missing_required_value": "fill in the value (the task's missing policy for this column is 'drop')",
    "out_of_range": "correct the value or its unit; the task config gives the allowed range and unit",
    "unparseable_value": "write a plain number (decimal point or, in a ';'-separated file, decimal comma)",
    "unknown_category": "use one of the spellings the task config accepts for this column",
    "duplicate_patient_conflict": "keep one row per patient_id; these rows disagree, so neither is used",
    "duplicate_patient_identical": "remove the repeated row (identical copies: one is used)",
    "label_not_in_classes": "use one of the task's class labels in the label column",
    # linking
    "patient_without_image": "export this patient's image into images/ or list it in manifest.csv",
    "image_without_clinical_row": "add a clinical.csv row for this PatientID, or fix the PatientID tag / manifest.csv",
    "no_patient_id": "the file has no PatientID tag: list it in manifest.csv (patient_id,path)",
    "manifest_unreadable": "manifest.csv needs a header with patient_id,path[,series_role]",
    "manifest_file_missing": "fix the path in manifest.csv (relative to the site folder) or export the file",
    "image_not_selected": "nothing: the task's image_select picked another image of this patient",
    "no_matching_series": "export the series the task asks for (task.series_description) or change task.image_select",
    # DICOM files
    "not_dicom": "remove the file from images/ or re-export it from the PACS as DICOM (Part 10)",
    "no_meta_header": "nothing needed (fedmsk read it); re-export as DICOM Part 10 so that every tool can read it",
    "invalid_header_value": "re-export the file, or correct the named element: its value does not fit its DICOM type",
    "truncated": "re-export the file: it ends before its pixel data is complete",
    "no_pixel_data": "export the image itself, not a report/structured document without pixels",
    "zero_size_image": "re-export the image: Rows or Columns is 0",
    "unsupported_transfer_syntax": "install the decoder named in the detail, or re-export uncompressed",
    "decode_failed": "re-export the file; the detail gives the stage and the decoder's message",
    "no_pixel_spacing": "export PixelSpacing/ImagerPixelSpacing, or set task.spacing_mm=null",
    "wrong_modality": "export the modality the task needs (2D radiograph vs CT series)",
    # CT series
    "series_missing_slice": "re-export the complete series: slice positions have a gap",
    "series_duplicate_slice": "remove the duplicate slice files (same position, different content)",
    "series_inconsistent_orientation": "re-export the series: its slices disagree on ImageOrientationPatient",
    "series_inconsistent_size": "re-export the series: its slices differ in Rows/Columns/PixelSpacing",
    "series_too_few_slices": "export a volume series with at least 2 slices",
    "series_no_geometry": "export ImagePositionPatient/ImageOrientationPatient, needed to order slices",
    # segmentation masks (optional, masks/<patient_id>.png|.npy|.dcm; shared/masks.py): the patient is kept without one
    "mask_missing": "nothing if intended (the patient trains without a mask); to add one, write masks/<patient_id>.png",
    "mask_unreadable": "re-export the mask as a label PNG, a .npy label array or a DICOM SEG (see the README data contract)",
    "mask_shape_mismatch": "export the mask at the image's matrix (Rows x Columns of the DICOM it annotates)",
    "mask_bad_labels": "use the label values 0 (background) and 1..K in the order of task.mask_labels",
    "mask_without_patient": "name the mask file after a patient_id in clinical.csv, or remove it",
    "mask_duplicate": "keep one mask per patient (one of .png, .npy, .dcm)",
}


@dataclass(frozen=True)
class RecordIssue:
    """One finding about one record: a patient row, an image file or a series.

    ``kept`` is True for findings that did not remove anything from training (an identical
    duplicate row, an extra image the task did not select); everything else means the record
    is not in the site's arrays.
    """

    patient_id: str
    file: str
    reason: str
    action: str
    detail: str = ""
    kept: bool = False

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown intake reason '{self.reason}'; add it to shared.records.REASONS")


def issue(reason: str, patient_id: str = "", file: str = "", detail: str = "", action: str | None = None,
          kept: bool = False) -> RecordIssue:
    """A RecordIssue with the reason's default action unless a more precise one is given."""
    return RecordIssue(patient_id=patient_id, file=file, reason=reason, action=action or REASONS[reason],
                       detail=detail, kept=kept)
