"""CT series -> one ordered volume, or a precise reason why it cannot be stacked.

A CT export is a folder of single-slice files in arbitrary file order. The only trustworthy
order is geometric: the slice position (ImagePositionPatient) projected on the slice normal
(the cross product of the two ImageOrientationPatient directions), which also gives the slice
spacing. A series whose positions show a gap, a repeated position, disagreeing orientations or
slice sizes would be stacked into a distorted volume, so it is refused with its reason instead.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.dicom import DicomError, read_dataset, scale_unit, stored_pixels, to_display

# relative tolerances: positions are written with limited decimals by scanners
_ORIENTATION_TOL = 1e-3
_GAP_FACTOR = 1.5  # a step this many times the typical spacing means missing slice(s)
_IRREGULAR_TOL = 0.2  # steps within +-20% of the typical spacing are regular


@dataclass
class SeriesGeometry:
    """Files in slice order and the voxel spacing (slice, row, col) in mm."""

    files: list[str]
    spacing_mm: tuple[float, float, float]


def group_by_series(headers: dict[str, dict[str, Any]], files: list[str]) -> dict[str, list[str]]:
    """SeriesInstanceUID -> its files (a file without the tag forms its own series)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for rel in files:
        groups[headers[rel]["series_uid"] or f"no-uid:{rel}"].append(rel)
    return dict(groups)


def order_slices(headers: dict[str, dict[str, Any]], files: list[str]) -> SeriesGeometry:
    """Order one series' files along the slice normal; DicomError(series_*) if it is not one clean volume."""
    metas = [headers[f] for f in files]
    if len(files) < 2:
        raise DicomError("series_too_few_slices", f"{len(files)} slice(s)")
    if any(m["position"] is None or m["orientation"] is None or len(m["orientation"]) != 6 for m in metas):
        missing = [f for f, m in zip(files, metas) if m["position"] is None or m["orientation"] is None]
        raise DicomError("series_no_geometry", f"no ImagePositionPatient/ImageOrientationPatient in {missing[:3]}")
    orientations = np.array([m["orientation"] for m in metas], dtype=np.float64)
    if np.abs(orientations - orientations[0]).max() > _ORIENTATION_TOL:
        distinct = np.unique(np.round(orientations, 3), axis=0)
        raise DicomError("series_inconsistent_orientation", f"{len(distinct)} different ImageOrientationPatient values")
    shapes = {(m["rows"], m["columns"], tuple(m["spacing_mm"] or ())) for m in metas}
    if len(shapes) > 1:
        raise DicomError("series_inconsistent_size", f"slices differ in (rows, columns, spacing): {sorted(shapes)[:3]}")
    row_dir, col_dir = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row_dir, col_dir)
    depth = np.array([np.dot(m["position"], normal) for m in metas])
    order = np.argsort(depth, kind="stable")
    depth = depth[order]
    steps = np.diff(depth)
    typical = float(np.median(steps))
    if typical <= 1e-6 or np.any(steps <= 1e-3 * max(typical, 1e-3)):
        dup = [files[order[i]] for i in np.flatnonzero(steps <= 1e-3 * max(typical, 1e-3))]
        raise DicomError("series_duplicate_slice", f"{len(dup)} slice position(s) repeated, e.g. {dup[:2]} at the same position")
    gaps = np.flatnonzero(steps > _GAP_FACTOR * typical)
    if len(gaps):
        missing = int(sum(round(steps[i] / typical) - 1 for i in gaps))
        where = ", ".join(f"{depth[i]:.1f}..{depth[i + 1]:.1f} mm" for i in gaps[:3])
        raise DicomError("series_missing_slice", f"about {missing} slice(s) missing between {where} (spacing {typical:.2f} mm)")
    irregular = np.abs(steps - typical) > _IRREGULAR_TOL * typical
    if irregular.any():
        raise DicomError("series_missing_slice", f"irregular slice steps {np.unique(np.round(steps, 2)).tolist()[:5]} mm")
    row_mm, col_mm = metas[0]["spacing_mm"] or (1.0, 1.0)
    return SeriesGeometry([files[i] for i in order], (typical, float(row_mm), float(col_mm)))


def read_volume(root: Path, geometry: SeriesGeometry) -> np.ndarray:
    """Decode the ordered slices into one [slices, rows, cols] volume in [0, 1].

    The volume is scaled as a whole: by the series' VOI window when every slice carries the
    same one, else by its min/max in modality units (e.g. HU), so slices stay comparable.
    """
    decoded = []
    for rel in geometry.files:
        path = root / rel
        ds = read_dataset(path)
        decoded.append((ds, stored_pixels(ds, path)))
    windows = {_window_signature(ds) for ds, _ in decoded}
    use_window = len(windows) == 1 and None not in windows
    slices, ranges = zip(*(to_display(arr, ds, window=use_window) for ds, arr in decoded))
    volume = np.stack(slices)
    monochrome1 = str(decoded[0][0].get("PhotometricInterpretation", "")) == "MONOCHROME1"
    return scale_unit(volume, ranges[0] if use_window else None, monochrome1)


def _window_signature(ds: Any) -> tuple[Any, ...] | None:
    if "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds):
        return (str(ds.get("WindowCenter")), str(ds.get("WindowWidth")), str(ds.get("RescaleSlope")),
                str(ds.get("RescaleIntercept")), "VOILUTSequence" in ds)
    return None
