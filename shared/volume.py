"""CT series -> the model's 3D input: HU volume, bone window, isotropic resampling, spine crop.

A CT task needs physical units, not display values: a fracture is a height loss in
millimetres and bone is bone by its Hounsfield units at every scanner. So a series is read
as HU (modality LUT only, per slice or per frame), windowed by ``task.hu_window`` (a bone
window, whatever window the PACS stored), resampled with MONAI's ``Spacing`` to the isotropic
``task.spacing_mm`` (slice spacing differs by scanner: 1-3 mm against sub-millimetre pixels),
and cut to ``task.image_size`` voxels around the spine (``task.crop=bone``: centred on the
bounding box of voxels above ``task.bone_hu``, because the spine is posterior and off the
scan centre, and its place depends on the field of view and the patient's position).

The result is deterministic and is what the site's cache keeps (``volume_key`` lists the
settings it depends on), so after the first epoch a 3D epoch costs no decoding or resampling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import BorderPad, Resize, ResizeWithPadOrCrop, Spacing, SpatialCrop
from monai.transforms.utils import generate_spatial_bounding_box
from pydicom.pixels import apply_modality_lut

from shared.config import TaskConfig
from shared.dicom import DicomError, read_dataset, stored_pixels
from shared.enhanced_ct import is_enhanced, read_enhanced

__all__ = ["ct_input", "is_enhanced", "preprocess_ct", "volume_key"]
from shared.series import SeriesGeometry, order_slices, read_volume
from shared.transforms import preprocess

VOLUME_VERSION = 1  # bump when preprocess_ct changes behaviour: cached volumes are then recomputed


def volume_key(task: TaskConfig) -> dict[str, Any]:
    """The CT settings the cached volumes depend on (merged into the cache's config key)."""
    if task.modality != "ct3d":
        return {}
    return {"volume_version": VOLUME_VERSION, "hu_window": task.hu_window, "crop": task.crop, "bone_hu": task.bone_hu}


def hu_slices(root: Path, geometry: SeriesGeometry) -> np.ndarray:
    """The ordered slice files as one HU volume [slices, rows, cols] (each slice's own rescale)."""
    slices = []
    for rel in geometry.files:
        ds = read_dataset(root / rel)
        slices.append(np.asarray(apply_modality_lut(stored_pixels(ds, root / rel), ds), dtype=np.float32))
    return np.stack(slices)


def ct_input(root: Path, files: list[str], headers: dict[str, dict[str, Any]], task: TaskConfig) -> np.ndarray:
    """One CT series (slice files or one enhanced file) -> float32 [1, *task.image_size] in [0, 1]."""
    if is_enhanced(headers, files):
        hu, spacing = read_enhanced(root / files[0])
    else:
        geometry = order_slices(headers, files)
        if task.hu_window is None and task.crop == "center":  # no CT settings: the series' own window, as before
            return preprocess(read_volume(root, geometry), geometry.spacing_mm, task)
        hu, spacing = hu_slices(root, geometry), geometry.spacing_mm
    return preprocess_ct(hu, spacing, task)


def preprocess_ct(hu: np.ndarray, spacing_mm: tuple[float, float, float], task: TaskConfig) -> np.ndarray:
    """HU [slices, rows, cols] with voxel spacing (slice, row, col) -> float32 [1, *task.image_size] in [0, 1]."""
    if hu.ndim != 3 or min(hu.shape) < 2:
        raise DicomError("series_too_few_slices", f"CT volume of shape {list(hu.shape)}; a 3D task needs a volume")
    if not np.isfinite(hu).all():
        raise DicomError("decode_failed", "CT volume holds NaN/inf after the rescale")
    lo, hi = task.hu_window if task.hu_window is not None else (float(hu.min()), float(hu.max()))
    scale = (hi - lo) if hi > lo else 1.0
    img = MetaTensor(torch.from_numpy(np.clip((hu - lo) / scale, 0.0, 1.0).astype(np.float32))[None],
                     affine=torch.diag(torch.tensor([*map(float, spacing_mm), 1.0], dtype=torch.float64)))
    size = tuple(int(s) for s in task.image_size)
    if task.spacing_mm is None:  # no physical scale asked for: the whole volume fitted to the input
        return np.clip(np.asarray(Resize(size, mode="trilinear")(img), dtype=np.float32), 0.0, 1.0)
    img = Spacing(pixdim=(task.spacing_mm,) * 3, mode="bilinear", padding_mode="border")(img)
    if task.crop == "bone":
        img = bone_crop(img, size, (task.bone_hu - lo) / scale)
    else:
        img = ResizeWithPadOrCrop(size, mode="constant")(img)
    return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)


def bone_crop(img: torch.Tensor, size: tuple[int, ...], level: float) -> torch.Tensor:
    """A ``size`` box centred on the bounding box of voxels above ``level`` (zero-padded at the
    volume's edges); the volume's centre when no voxel is bone."""
    start, end = generate_spatial_bounding_box(img, select_fn=lambda x: x > level)
    shape = img.shape[1:]
    if any(e <= s for s, e in zip(start, end)):
        centre = [n // 2 for n in shape]
    else:
        centre = [(s + e) // 2 for s, e in zip(start, end)]
    half = [n // 2 + 1 for n in size]
    padded = BorderPad(spatial_border=half, mode="constant")(img)
    return SpatialCrop(roi_center=[c + h for c, h in zip(centre, half)], roi_size=size)(padded)
