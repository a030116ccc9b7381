"""CT volumes: enhanced multi-frame CT, HU window, isotropic resampling, spine crop, cached volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared.config import TaskConfig, compose
from shared.dicom import DicomError, read_header
from shared.enhanced_ct import read_enhanced
from shared.series import order_slices
from shared.volume import hu_slices, preprocess_ct
from simulation import synth_ct
from simulation.synth_ct import CTScanner, stored_values, write_enhanced, write_series

SLICES = CTScanner("T", 2.0, 2.0, 0.8, "B", 0.0, 0.0, True, 1.0, 0.0, False, True)  # signed, head-first files
FRAMES = CTScanner("T", 2.0, 2.0, 0.8, "B", 0.0, 0.0, False, 0.5, -1024.0, True, False)  # unsigned, slope 0.5
UIDS = {"study": "1.2.826.0.1.3680043.8.498.1", "series": "1.2.826.0.1.3680043.8.498.2", "frame": "1.2.826.0.1.3680043.8.498.3"}


def ct_task(**kw) -> TaskConfig:
    task = compose(["task=vertebral_fracture"]).task
    for k, v in kw.items():
        setattr(task, k, v)
    return task


def hu_phantom(depth: int = 12, size: int = 20, seed: int = 0) -> np.ndarray:
    """Integer HU (so both storages hold it exactly): soft tissue, a bone block, a slice ramp."""
    rng = np.random.default_rng(seed)
    hu = np.full((depth, size, size), 40.0) + rng.integers(-20, 20, (depth, size, size))
    hu[3:9, 4:10, 11:17] = 700.0
    return hu + 10.0 * np.arange(depth)[:, None, None]


def headers_of(root: Path) -> dict[str, dict]:
    return {str(p.relative_to(root)): read_header(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_enhanced_ct_and_a_folder_of_slices_give_the_same_hu_volume(tmp_path):
    hu = hu_phantom()
    origin = (-8.0, -8.0, 500.0)
    rng = np.random.default_rng(0)
    write_series(tmp_path / "slices", stored_values(hu, SLICES), origin, SLICES, "P1", "F", UIDS, rng)
    write_enhanced(tmp_path / "one.dcm", stored_values(hu, FRAMES), origin, FRAMES, "P1", "F", UIDS, rng)
    headers = headers_of(tmp_path / "slices")
    geometry = order_slices(headers, list(headers))
    from_slices = hu_slices(tmp_path / "slices", geometry)
    from_frames, spacing = read_enhanced(tmp_path / "one.dcm")
    assert tuple(spacing) == pytest.approx((2.0, 0.8, 0.8)) and tuple(geometry.spacing_mm) == pytest.approx((2.0, 0.8, 0.8))
    np.testing.assert_array_equal(from_slices, hu)  # head-first files, ordered feet to head by position
    np.testing.assert_array_equal(from_frames, hu)  # shuffled frames, per-frame positions, slope 0.5
    assert read_header(tmp_path / "one.dcm")["frames"] == hu.shape[0]


def test_enhanced_ct_with_a_missing_frame_is_refused(tmp_path):
    hu = hu_phantom()
    write_enhanced(tmp_path / "gap.dcm", stored_values(hu, FRAMES), (0.0, 0.0, 0.0), FRAMES, "P1", "F", UIDS,
                   np.random.default_rng(1), drop=5)
    with pytest.raises(DicomError) as err:
        read_enhanced(tmp_path / "gap.dcm")
    assert err.value.reason == "series_missing_slice"


def test_hu_window_maps_the_bone_window_to_unit_range():
    hu = np.full((8, 8, 8), -500.0)
    hu[:, :, 4:] = 1300.0
    hu[:, :, 6:] = 400.0
    out = preprocess_ct(hu, (1.0, 1.0, 1.0), ct_task(spacing_mm=None, image_size=[8, 8, 8]))[0]
    np.testing.assert_allclose(out[:, :, [0, 4, 7]][0, 0], [0.0, 1.0, 0.5], atol=1e-6)


def test_resampling_keeps_millimetres_whatever_the_slice_spacing():
    """A 20 mm tall, 10 mm wide block scanned with 4 mm slices and 1 mm pixels is 10 x 5 voxels at 2 mm."""
    hu = np.full((20, 40, 40), -1000.0)
    hu[5:10, 10:20, 10:20] = 1000.0  # 5 slices x 4 mm = 20 mm; 10 px x 1 mm = 10 mm
    out = preprocess_ct(hu, (4.0, 1.0, 1.0), ct_task(spacing_mm=2.0, image_size=[40, 20, 20], crop="center"))[0]
    assert out.shape == (40, 20, 20)
    bone = out > 0.5
    zs, ys, xs = (np.flatnonzero(bone.any(axis=ax)) for ax in ((1, 2), (0, 2), (0, 1)))
    assert len(zs) == pytest.approx(10, abs=1) and len(ys) == pytest.approx(5, abs=1) and len(xs) == pytest.approx(5, abs=1)


def test_bone_crop_centres_the_box_on_the_spine_not_the_scan():
    hu = np.full((30, 60, 60), 40.0)
    hu[10:20, 38:50, 5:15] = 600.0  # off-centre "spine": posterior and to one side
    task = ct_task(spacing_mm=1.0, image_size=[16, 16, 16])
    centred = preprocess_ct(hu, (1.0, 1.0, 1.0), task)[0]
    zs, ys, xs = np.nonzero(centred > 0.5)
    assert len(zs) and [zs.mean(), ys.mean(), xs.mean()] == pytest.approx([7.5, 7.5, 7.5], abs=1.0)
    task.crop = "center"
    assert not (preprocess_ct(hu, (1.0, 1.0, 1.0), task)[0] > 0.5).any()  # the scan centre misses it


def test_a_warm_load_decodes_nothing_and_a_new_window_recomputes(tmp_path, monkeypatch):
    from shared import enhanced_ct, volume
    from shared.sitedata import load_site

    cfg = compose(["task=vertebral_fracture", "num_sites=3", "synth.patients_per_site=[10]", "synth.image_size=32",
                   f"data_root={tmp_path / 'fed'}", "task.image_size=[16,16,16]", "task.spacing_mm=5.0"])
    synth_ct.write_federation(cfg)
    sites = [tmp_path / "fed" / s for s in ("site_a", "site_c")]  # slice files, enhanced files
    cold = [load_site(s, cfg.task) for s in sites]

    calls: list[str] = []

    def counted(real):
        def decode(*args, **kwargs):
            calls.append(real.__name__)
            return real(*args, **kwargs)
        return decode

    monkeypatch.setattr(volume, "hu_slices", counted(volume.hu_slices))
    monkeypatch.setattr(volume, "read_enhanced", counted(enhanced_ct.read_enhanced))
    for site, before in zip(sites, cold):
        warm = load_site(site, cfg.task)
        assert len(warm.labels) == len(before.labels) == 7  # 10 minus age 150, no series, gap
        np.testing.assert_array_equal(warm.images, before.images)
    assert calls == []  # every volume came from the cache
    cfg.task.hu_window = [-200.0, 1000.0]
    changed = load_site(sites[1], cfg.task)
    assert calls.count("read_enhanced") == 8  # a new window is a new cache key: every series decoded again
    assert not np.array_equal(changed.images, cold[1].images)
