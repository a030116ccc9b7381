"""The loading contract: DICOM display semantics, clinical schema checks, split, datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dicom_factory import ramp, task_config, valid_row, write_dicom, write_site
from shared.clinical import ClinicalScaler, feature_names
from shared.config import SplitConfig
from shared.dicom import read_image
from shared.sitedata import load_site, make_datasets, split_indices


def test_monochrome1_and_monochrome2_give_the_same_image(tmp_path):
    img = ramp(high=4095)
    mono2 = read_image(write_dicom(tmp_path / "m2.dcm", img, bits_stored=12)).pixels
    mono1 = read_image(write_dicom(tmp_path / "m1.dcm", (4095 - img).astype(np.uint16), bits_stored=12,
                                   photometric="MONOCHROME1")).pixels
    assert mono2.dtype == np.float32 and mono2.shape == img.shape
    assert mono2.min() == 0.0 and mono2.max() == 1.0
    np.testing.assert_allclose(mono1, mono2, atol=1e-6)
    # bright stays bright: the largest stored MONOCHROME2 value is the brightest output pixel
    assert np.unravel_index(mono2.argmax(), img.shape) == np.unravel_index(img.argmax(), img.shape)


def test_window_is_applied_and_mirrored_for_monochrome1(tmp_path):
    img = ramp(high=4095)
    center, width = 1500, 1000
    mono2 = read_image(write_dicom(tmp_path / "w2.dcm", img, bits_stored=12, WindowCenter=center,
                                   WindowWidth=width)).pixels
    mono1 = read_image(write_dicom(tmp_path / "w1.dcm", (4095 - img).astype(np.uint16), bits_stored=12,
                                   photometric="MONOCHROME1", WindowCenter=4095 - center + 1, WindowWidth=width)).pixels
    np.testing.assert_allclose(mono1, mono2, atol=1e-6)
    # the window clips: everything above centre + width/2 is white, below centre - width/2 black
    assert np.all(mono2[img >= center + width / 2] == 1.0)
    assert np.all(mono2[img < center - width / 2] == 0.0)
    inside = (img > center - width / 2 + 2) & (img < center + width / 2 - 2)
    expected = (img[inside] - (center - 0.5)) / (width - 1) + 0.5
    np.testing.assert_allclose(mono2[inside], expected, atol=1e-4)


def _site(tmp_path, rows, pids=None):
    pids = pids if pids is not None else [r.split(",")[0] for r in rows]
    return write_site(tmp_path / "site", rows, images={p: ramp() for p in pids})


def test_out_of_range_value_is_reported_and_the_row_not_used(tmp_path):
    task = task_config(image_size=[16, 16])
    site = load_site(_site(tmp_path, [valid_row("A"), valid_row("B", height="1.65"), valid_row("C", label=1)]), task)
    assert site.patient_ids == ["A", "C"]
    (bad,) = [i for i in site.issues if i.patient_id == "B"]
    assert bad.reason == "out_of_range" and "height_cm" in bad.detail and "clinical.csv:3" in bad.file
    assert "cm" in bad.action
    assert site.images.shape == (2, 1, 16, 16) and site.images.dtype == np.float32
    assert site.labels.tolist() == [0, 1]


def test_missing_value_policies(tmp_path):
    task = task_config(image_size=[16, 16])
    grip = next(c for c in task.columns if c.name == "grip_strength_kg")
    grip.feature = True  # indicator policy on a feature column -> a grip_strength_kg_missing input
    rows = [valid_row("drop", age=""),  # age: missing=drop
            valid_row("imp", weight=""),  # weight_kg: missing=impute
            valid_row("ind", grip=""),  # grip_strength_kg: missing=indicator
            *[valid_row(f"ok{i}", label=i % 2, weight=str(60 + i)) for i in range(10)]]
    site = load_site(_site(tmp_path, rows), task)
    assert "drop" not in site.patient_ids and {"imp", "ind"} <= set(site.patient_ids)
    assert [(i.reason, i.patient_id) for i in site.issues if not i.kept] == [("missing_required_value", "drop")]
    names = feature_names(task)
    assert names[-1] == "grip_strength_kg_missing"
    scaler = ClinicalScaler(task).fit(site.clinical_raw)
    feats = scaler.transform(site.clinical_raw)
    assert np.isfinite(feats).all()
    imp = site.patient_ids.index("imp")
    weights = site.clinical_raw[:, [c.name for c in task.columns].index("weight_kg")]
    assert np.isnan(weights[imp])
    w = names.index("weight_kg")
    median = np.nanmedian(weights)
    assert feats[imp, w] == pytest.approx((median - scaler.mean[w]) / scaler.std[w], abs=1e-5)
    ind = names.index("grip_strength_kg_missing")
    assert feats[site.patient_ids.index("ind"), ind] == 1.0
    assert feats[[i for i, p in enumerate(site.patient_ids) if p != "ind"], ind].tolist() == [0.0] * (len(feats) - 1)


def test_feature_names_match_the_dataset_clinical_vector(tmp_path):
    task = task_config(image_size=[16, 16])
    sex = next(c for c in task.columns if c.name == "sex")
    sex.categories = {"M": 1, "F": 0, "X": 2}  # three codes -> one-hot
    task.columns[5].feature = True
    names = feature_names(task)
    assert names[:4] == ["age", "sex=0", "sex=1", "sex=2"] and names[-1] == "grip_strength_kg_missing"
    rows = [valid_row(f"p{i}", label=i % 2, sex="MFX"[i % 3]) for i in range(12)]
    datasets = make_datasets(load_site(_site(tmp_path, rows), task), task, seed=0)
    item = datasets["train"][0]
    assert item["clinical"].shape == (len(names),)
    assert item["image"].shape == (1, 16, 16) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.long and item["label"].shape == ()
    onehot = torch.stack([datasets["val"][i]["clinical"][1:4] for i in range(len(datasets["val"]))])
    assert torch.all(onehot.sum(dim=1) == 1)


def test_scaler_is_fitted_on_the_training_split_only(tmp_path):
    task = task_config(image_size=[16, 16], augment=False)
    rows = [valid_row(f"p{i:02d}", label=int(i % 3 == 0), age=40 + i) for i in range(30)]
    site = load_site(_site(tmp_path, rows), task)
    split = split_indices(site.labels, task.split, 0, site.patient_ids)
    age = feature_names(task).index("age")

    def train_ages(raw):
        site.clinical_raw = raw
        ds = make_datasets(site, task, seed=0)["train"]
        return torch.stack([ds[i]["clinical"][age] for i in range(len(ds))])

    before = train_ages(site.clinical_raw.copy())
    assert before.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert before.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    moved = site.clinical_raw.copy()
    moved[np.concatenate([split["val"], split["test"]]), 0] = 109.0  # only held-out ages change
    torch.testing.assert_close(train_ages(moved), before)


def test_split_is_stratified_deterministic_and_keeps_patients_together():
    labels = np.array([1] * 30 + [0] * 70)
    cfg = SplitConfig(val=0.2, test=0.2)
    a = split_indices(labels, cfg, seed=3)
    assert a.keys() == {"train", "val", "test"}
    assert sorted(np.concatenate(list(a.values())).tolist()) == list(range(100))
    for name, n in (("val", 20), ("test", 20), ("train", 60)):
        assert len(a[name]) == n and labels[a[name]].sum() == n * 0.3
    b = split_indices(labels, cfg, seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], split_indices(labels, cfg, seed=4)["test"])
    # one row per patient: the same split with or without groups
    ids = [f"p{i}" for i in range(100)]
    assert all(np.array_equal(a[k], split_indices(labels, cfg, 3, groups=ids)[k]) for k in a)
    # two views per patient never straddle splits
    views = np.repeat(labels, 2)
    view_ids = np.repeat(ids, 2)
    g = split_indices(views, cfg, 3, groups=view_ids.tolist())
    owners = [set(view_ids[idx]) for idx in g.values()]
    assert sum(len(o) for o in owners) == 100 and len(set().union(*owners)) == 100
    assert [len(idx) for idx in g.values()] == [120, 40, 40]


def test_train_augmentation_is_seeded_and_stays_in_range(tmp_path):
    task = task_config(image_size=[16, 16])
    rows = [valid_row(f"p{i}", label=i % 2) for i in range(10)]
    site = load_site(_site(tmp_path, rows), task)
    one = [make_datasets(site, task, seed=7)["train"][i]["image"] for i in range(3)]
    two = [make_datasets(site, task, seed=7)["train"][i]["image"] for i in range(3)]
    for x, y in zip(one, two):
        torch.testing.assert_close(x, y)
        assert 0.0 <= x.min() and x.max() <= 1.0
    plain = make_datasets(site, task_config(image_size=[16, 16], augment=False), seed=7)["train"]
    assert any(not torch.equal(one[i], plain[i]["image"]) for i in range(3))


def test_memory_does_not_grow_with_the_frames_a_2d_task_does_not_use(tmp_path):
    """A 2D task keeps frame 0 of a multi-frame file; the other frames are never decoded or read."""
    import tracemalloc

    peaks = {}
    for frames in (2, 60):
        root = write_site(tmp_path / f"s{frames}", [valid_row("p1")])
        stack = np.stack([ramp(128, 128, high=4000 - 10 * k) for k in range(frames)])
        write_dicom(root / "images" / "p1.dcm", stack, patient_id="p1")
        load_site(root, task_config(image_size=[16, 16]), use_cache=False)  # imports and lazy set-up first
        tracemalloc.start()
        site = load_site(root, task_config(image_size=[16, 16]), use_cache=False, verify_all=True)
        peaks[frames] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert site.patient_ids == ["p1"]
        single = load_site(write_site(tmp_path / f"one{frames}", [valid_row("p1")],
                                      images={"p1": stack[0]}), task_config(image_size=[16, 16]), use_cache=False)
        np.testing.assert_allclose(site.images, single.images, atol=1e-6)  # frame 0, as if exported alone
    assert peaks[60] < 1.5 * peaks[2], peaks  # 58 more frames: 1.9 MB stored, 7.6 MB as float64 if decoded
