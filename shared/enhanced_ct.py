"""Enhanced (multi-frame) CT: a whole series in one file, its geometry in functional groups.

Modern scanners and PACS export CT as one Enhanced CT Image Storage object instead of one
file per slice. The frames' positions are not top-level tags but items of
``PerFrameFunctionalGroupsSequence`` (``PlanePositionSequence``), and orientation, pixel
spacing and the HU rescale sit in ``SharedFunctionalGroupsSequence`` (or per frame). Frames
need not be stored in spatial order, so they are ordered exactly like single-slice files:
by their position on the slice normal, with the same gap / duplicate / orientation checks
(``shared.series.order_slices`` on one pseudo-header per frame). pydicom decodes the pixel
data but does not assemble the volume or apply per-frame rescales, hence this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from shared.dicom import DicomError, read_dataset, stored_pixels
from shared.series import order_slices


def is_enhanced(headers: dict[str, dict[str, Any]], files: list[str] | tuple[str, ...]) -> bool:
    """A series given as one multi-frame file without top-level slice geometry."""
    return len(files) == 1 and int(headers[files[0]].get("frames", 1)) > 1 and headers[files[0]].get("position") is None


def _group(ds: Dataset, frame_item: Dataset | None, sequence: str) -> Dataset | None:
    """The functional group ``sequence`` for one frame: its own item first, else the shared one."""
    for holder in (frame_item, (ds.get("SharedFunctionalGroupsSequence") or [None])[0]):
        if holder is not None and holder.get(sequence):
            return holder.get(sequence)[0]
    return None


def _floats(item: Dataset | None, keyword: str) -> list[float] | None:
    value = item.get(keyword) if item is not None else None
    try:
        return [float(v) for v in value] if value is not None and len(value) else None
    except (TypeError, ValueError):
        return None


def read_enhanced(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """One Enhanced CT file -> (HU volume [slices, rows, cols] in slice order, spacing (slice, row, col) mm)."""
    ds = read_dataset(path)
    frames = stored_pixels(ds, path)
    frames = frames[None] if frames.ndim == 2 else frames
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != frames.shape[0]:
        raise DicomError("series_no_geometry",
                         f"enhanced CT with {frames.shape[0]} frames but {len(per_frame)} PerFrameFunctionalGroupsSequence items")
    headers: dict[str, dict[str, Any]] = {}
    rescale: dict[str, tuple[float, float]] = {}
    for i, item in enumerate(per_frame):
        measures = _group(ds, item, "PixelMeasuresSequence")
        orientation = _floats(_group(ds, item, "PlaneOrientationSequence"), "ImageOrientationPatient")
        transform = _group(ds, item, "PixelValueTransformationSequence")
        slope = float(transform.get("RescaleSlope", 1.0)) if transform is not None else float(ds.get("RescaleSlope", 1.0))
        intercept = float(transform.get("RescaleIntercept", 0.0)) if transform is not None else float(ds.get("RescaleIntercept", 0.0))
        key = f"frame {i + 1}"
        headers[key] = {
            "position": _floats(_group(ds, item, "PlanePositionSequence"), "ImagePositionPatient"),
            "orientation": orientation or _floats(ds, "ImageOrientationPatient"),
            "rows": frames.shape[1], "columns": frames.shape[2],
            "spacing_mm": _floats(measures, "PixelSpacing"),
        }
        rescale[key] = (slope, intercept)
    geometry = order_slices(headers, list(headers))  # same refusals as a folder of slices
    index = {key: i for i, key in enumerate(headers)}
    hu = np.stack([frames[index[k]].astype(np.float32) * rescale[k][0] + rescale[k][1] for k in geometry.files])
    return hu, geometry.spacing_mm
