"""CT series assembly: geometric slice order, spacing from positions, broken series refused."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.uid import generate_uid

from dicom_factory import task_config, valid_row, write_dicom, write_site
from shared.dicom import DicomError, read_header
from shared.series import order_slices, read_volume
from shared.sitedata import load_site

# an oblique axial stack: rows along x, columns tilted 30 degrees in the y-z plane
ORIENT = [1.0, 0.0, 0.0, 0.0, float(np.cos(np.pi / 6)), float(np.sin(np.pi / 6))]
NORMAL = np.cross(ORIENT[:3], ORIENT[3:])


def ct_volume(depth: int = 6, size: int = 12) -> np.ndarray:
    """HU volume whose slice k is -500 + 150 k plus a small in-plane ramp: order is visible."""
    ramp = np.add.outer(np.arange(size), np.arange(size)).astype(np.int16)
    return np.stack([(-500 + 150 * k + ramp).astype(np.int16) for k in range(depth)])


def write_series(folder, pid, volume, step=2.5, drop=(), duplicate=None, tilt_slice=None, seed=0):
    """One file per slice under random names, written in shuffled order; returns the files."""
    uid = generate_uid()
    rng = np.random.default_rng(seed)
    files = []
    for k in rng.permutation(len(volume)):
        if k in drop:
            continue
        orient = list(ORIENT)
        if k == tilt_slice:
            orient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        position = (np.array([-30.0, 12.0, 40.0]) + k * step * NORMAL).tolist()
        stored = (volume[k] + 1024).astype(np.uint16)  # unsigned storage, HU via the intercept
        kwargs = dict(patient_id=pid, Modality="CT", SeriesInstanceUID=uid, ImagePositionPatient=position,
                      ImageOrientationPatient=orient, PixelSpacing=[0.8, 0.8], RescaleSlope=1, RescaleIntercept=-1024,
                      SeriesDescription="AX ABDOMEN", SeriesNumber=3, InstanceNumber=int(rng.integers(1, 999)))
        files.append(write_dicom(folder / f"{rng.integers(1e9):09d}.dcm", stored, **kwargs))
        if k == duplicate:
            files.append(write_dicom(folder / f"dup{k}.dcm", stored + 1, **kwargs))
    return files


def _headers(files):
    return {str(f): read_header(f) for f in files}


def test_shuffled_series_is_ordered_along_the_normal_with_spacing_from_positions(tmp_path):
    volume = ct_volume()
    files = write_series(tmp_path, "C1", volume, step=2.5)
    headers = _headers(files)
    geometry = order_slices(headers, list(headers))
    assert geometry.spacing_mm == pytest.approx((2.5, 0.8, 0.8))
    decoded = read_volume(tmp_path, geometry)
    assert decoded.shape == volume.shape
    # scaled as one volume (min/max of the HU values), so slices keep their relative brightness
    expected = (volume - volume.min()) / (volume.max() - volume.min())
    np.testing.assert_allclose(decoded, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [({"drop": (3,)}, "series_missing_slice"),
     ({"duplicate": 2}, "series_duplicate_slice"),
     ({"tilt_slice": 4}, "series_inconsistent_orientation")],
)
def test_broken_series_is_refused_with_its_reason(tmp_path, kwargs, reason):
    files = write_series(tmp_path, "C1", ct_volume(), **kwargs)
    with pytest.raises(DicomError) as err:
        order_slices(_headers(files), [str(f) for f in files])
    assert err.value.reason == reason


def test_site_with_a_missing_slice_reports_it_and_loads_the_complete_series(tmp_path):
    task = task_config(modality="ct3d", spatial_dims=3, image_size=[8, 16, 16])
    root = write_site(tmp_path / "site", [valid_row("good", label=1), valid_row("gap", label=0)])
    write_series(root / "images" / "good", "good", ct_volume(), seed=1)
    write_series(root / "images" / "gap", "gap", ct_volume(), drop=(2,), seed=2)
    site = load_site(root, task)
    assert site.patient_ids == ["good"]
    assert site.images.shape == (1, 1, 8, 16, 16)
    # slice order survives preprocessing: mean brightness rises through the volume
    means = site.images[0, 0].mean(axis=(1, 2))
    assert np.all(np.diff(means) > 0)
    (gap,) = [i for i in site.issues if i.patient_id == "gap"]
    assert gap.reason == "series_missing_slice" and "images/gap" in gap.file and "1 slice" in gap.detail
