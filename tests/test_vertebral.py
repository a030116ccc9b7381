"""Vertebral fracture task: synthetic CT hospitals, grading metrics and their pooling, the wire,
and DP decoupling of the 3D model's auxiliary losses."""

from __future__ import annotations

import csv
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score

from client.trainer import build_screener
from shared.config import ConfigError, compose
from shared.grading import grading_metric_keys, pool_grading
from shared.messages import EVAL_METRIC_KEYS, is_count_key, site_reply
from shared.metrics import classification_metrics
from shared.sitedata import load_site
from simulation import synth_ct
from simulation.generators import generator_for, write_federation
from simulation.oracle import oracle_auc
from tests.test_privacy import per_sample_grads

CT = ["task=vertebral_fracture", "model=fracture3d"]


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct") / "fed"
    cfg = compose(CT + [f"data_root={root}", "num_sites=3", "synth.patients_per_site=[24]", "synth.prevalence=[0.5]",
                        "synth.image_size=40", "task.image_size=[20,20,20]", "task.spacing_mm=4.0"])
    write_federation(cfg)
    return cfg, root


def _oracle(root: Path) -> dict[tuple[str, str], dict[str, str]]:
    with (root / "oracle.csv").open() as fh:
        return {(r["site"], r["patient_id"]): r for r in csv.DictReader(fh)}


def test_synth_dispatches_on_the_task_and_writes_ct_series_with_their_geometry(fed):
    cfg, root = fed
    assert generator_for(cfg).write_federation is synth_ct.write_federation
    assert generator_for(compose(["task=vertebral_fracture_binary"])) is generator_for(cfg)
    with pytest.raises(ConfigError, match="no synthetic generator"):
        cfg2 = compose(CT)
        cfg2.task.name = "unknown"
        generator_for(cfg2)
    slices = sorted((root / "site_a" / "images").rglob("IM*"))
    ds = pydicom.dcmread(slices[0])
    assert ds.SOPClassUID == synth_ct.CT_STORAGE and ds.Modality == "CT" and ds.RescaleType == "HU"
    assert len(ds.ImagePositionPatient) == 3 and list(ds.ImageOrientationPatient) == [1, 0, 0, 0, 1, 0]
    assert float(ds.SliceThickness) == 2.0 and len(ds.PixelSpacing) == 2
    enhanced = pydicom.dcmread(next((root / "site_c" / "images").glob("*.dcm")))
    assert enhanced.SOPClassUID == synth_ct.ENHANCED_CT_STORAGE and int(enhanced.NumberOfFrames) > 10
    assert "PlanePositionSequence" in enhanced.PerFrameFunctionalGroupsSequence[0]


def test_slice_writer_writes_what_pydicom_writes(tmp_path):
    sc = synth_ct._SCANNERS[1]
    uids = {"study": "1.2.3", "series": "1.2.3.4", "frame": "1.2.5"}
    ds = synth_ct._base_dataset(sc, "P1", "F", uids, synth_ct.CT_STORAGE, 8)
    ds.ImageOrientationPatient, ds.PixelSpacing = [1, 0, 0, 0, 1, 0], ["1", "1"]
    synth_ct._rescale(ds, sc)
    pixels = (np.arange(64).reshape(8, 8) - 30).astype(np.int16)
    values = {"SOPInstanceUID": synth_ct._instance_uid(uids, 6), "InstanceNumber": "7",
              "ImagePositionPatient": "1.000\\2.000\\3.500", "SliceLocation": "3.500", "PixelData": pixels.tobytes()}
    synth_ct._SliceWriter(ds, synth_ct._instance_uid(uids, 0)).write(tmp_path / "fast.dcm", values)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = values["SOPInstanceUID"]
    ds.InstanceNumber, ds.ImagePositionPatient, ds.SliceLocation = 7, ["1.000", "2.000", "3.500"], "3.500"
    ds.PixelData = pixels.tobytes()
    ds.save_as(tmp_path / "pydicom.dcm", enforce_file_format=True)
    assert (tmp_path / "fast.dcm").read_bytes() == (tmp_path / "pydicom.dcm").read_bytes()


def test_labels_are_genant_grades_of_a_noisy_reading_and_the_oracle_grades_the_truth(fed):
    cfg, root = fed
    oracle = _oracle(root)
    loss = np.array([float(r["latent_score"]) for r in oracle.values()])
    label = np.array([int(r["label"]) for r in oracle.values()])
    truth = np.array([int(r["oracle_grade"]) for r in oracle.values()])
    np.testing.assert_array_equal(truth, synth_ct.genant_grade(loss))
    assert set(label) == {0, 1, 2, 3}
    assert 0.75 < np.mean(truth == label) < 1.0  # the reading noise flips grades near the band edges
    assert (label > 0).mean() == pytest.approx(0.5, abs=0.12)
    keys = list(oracle)
    assert 0.9 < oracle_auc(root, keys) < 1.0  # screening AUC of the true height loss (label > 0 is positive)


def test_each_site_reports_its_unusable_records_and_loads_the_rest(fed):
    cfg, root = fed
    for site in ("site_a", "site_c"):
        data = load_site(root / site, cfg.task)
        reasons = Counter(i.reason for i in data.issues if not i.kept)
        assert {"out_of_range", "patient_without_image", "series_missing_slice"} <= set(reasons), reasons
        assert "image_without_clinical_row" in reasons
        assert data.images.shape == (21, 1, 20, 20, 20)


def test_the_volumes_show_the_height_loss(fed):
    """Bone voxels in the crop fall with the fractured vertebra's height loss (the image carries the label)."""
    cfg, root = fed
    oracle = _oracle(root)
    loss, bone = [], []
    for site in ("site_a", "site_b", "site_c"):
        data = load_site(root / site, cfg.task)
        level = (cfg.task.bone_hu - cfg.task.hu_window[0]) / (cfg.task.hu_window[1] - cfg.task.hu_window[0])
        bone += list((data.images > level).mean(axis=(1, 2, 3, 4)))
        loss += [float(oracle[(site, pid)]["latent_score"]) for pid in data.patient_ids]
    assert np.corrcoef(loss, bone)[0, 1] < -0.2


def test_binary_setting_maps_grades_to_fracture_yes_no(fed):
    cfg, root = fed
    binary = compose(["task=vertebral_fracture_binary", *CT[1:]]).task
    binary.image_size, binary.spacing_mm = cfg.task.image_size, cfg.task.spacing_mm
    grades = load_site(root / "site_b", cfg.task)
    yes_no = load_site(root / "site_b", binary)
    assert grades.patient_ids == yes_no.patient_ids
    np.testing.assert_array_equal(yes_no.labels, (grades.labels > 0).astype(int))
    np.testing.assert_array_equal(yes_no.images, grades.images)


# ---------------------------------------------------------------------------- grading metrics
def _predictions(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    logits = rng.normal(0, 1, (n, 4)) + 1.5 * np.eye(4)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return labels, probs


def test_grading_metrics_match_sklearn_and_screen_on_one_minus_p0():
    labels, probs = _predictions(80, 0)
    m = classification_metrics(labels, probs)
    pred = probs.argmax(1)
    cm = confusion_matrix(labels, pred, labels=range(4))
    assert all(m[f"cm_{t}{p}"] == cm[t, p] for t in range(4) for p in range(4))
    np.testing.assert_allclose([m[f"f1_class{k}"] for k in range(4)], f1_score(labels, pred, average=None))
    assert m["f1"] == pytest.approx(f1_score(labels, pred, average="macro"))
    assert m["screen_auc"] == pytest.approx(roc_auc_score(labels > 0, 1 - probs[:, 0]))
    called, positive = 1 - probs[:, 0] >= 0.5, labels > 0
    assert m["screen_sen"] == pytest.approx((called & positive).sum() / positive.sum())
    assert m["screen_spc"] == pytest.approx((~called & ~positive).sum() / (~positive).sum())


def test_pooled_grading_from_site_counts_equals_metrics_on_pooled_predictions():
    from server.strategy import pool_site_metrics

    sites = [_predictions(n, s) for n, s in ((40, 1), (25, 2), (33, 3))]
    rows = [classification_metrics(y, p) | {"num-examples": len(y), "loss": 1.0} for y, p in sites]
    pooled = pool_site_metrics(rows)
    everything = classification_metrics(np.concatenate([y for y, _ in sites]), np.concatenate([p for _, p in sites]))
    for key in ["f1", "acc", "sen", "spc", "pre", "screen_sen", "screen_spc"] + [f"f1_class{k}" for k in range(4)]:
        assert pooled[key] == pytest.approx(everything[key]), key
    assert abs(pooled["screen_auc"] - everything["screen_auc"]) < 0.01  # from the summed screening histograms
    binary = np.array([0, 1] * 15)
    assert pool_grading([classification_metrics(binary, np.eye(2)[binary] * 0.8 + 0.1)]) == {}  # a binary task: nothing added


def test_every_site_sends_the_same_whitelisted_keys_even_without_a_grade():
    labels, probs = _predictions(30, 5)
    keep = labels != 2  # this site has no moderate fracture in its split
    a = classification_metrics(labels, probs) | {"num-examples": 30, "loss": 1.0}
    b = classification_metrics(labels[keep], probs[keep]) | {"num-examples": int(keep.sum()), "loss": 1.0}
    assert set(a) == set(b) and set(a) <= EVAL_METRIC_KEYS and grading_metric_keys() <= EVAL_METRIC_KEYS
    site_reply(site_name="s", metrics=b, allowed=EVAL_METRIC_KEYS)  # not refused
    assert is_count_key("cm_31") and is_count_key("screen_fn") and is_count_key("screen_hist_pos_07")
    assert not is_count_key("f1_class3") and not is_count_key("screen_auc")


# ---------------------------------------------------------------------------- DP
def _replaced_patient_effect(aux: str) -> torch.Tensor:
    """Max change of each OTHER patient's per-sample gradient (3D model) when patient 3 is replaced."""
    cfg = compose(CT + ["task.image_size=[16,16,16]", "model.width=4", "model.embed_dim=16", "model.proj_dim=8",
                        "model.clinical_hidden=8", f"model.aux_loss={aux}", "model.aux_weight=0.5"])
    g = torch.Generator().manual_seed(0)
    image, clinical, labels = torch.rand(8, 1, 16, 16, 16, generator=g), torch.randn(8, 3, generator=g), torch.arange(8) % 4
    base = per_sample_grads(build_screener(cfg), image, clinical, labels)
    image[3], clinical[3], labels[3] = torch.rand(1, 16, 16, 16, generator=g), torch.randn(3, generator=g), (labels[3] + 1) % 4
    moved = per_sample_grads(build_screener(cfg), image, clinical, labels)
    keep = [i for i in range(8) if i != 3]
    return (moved[keep] - base[keep]).abs().amax(dim=1) / base[keep].abs().amax(dim=1)


def test_3d_model_under_dp_gets_the_per_sample_contrast_and_it_decouples_patients():
    cfg = compose(CT + ["privacy=eps8"])
    assert cfg.model.name == "fracture3d" and cfg.task.spatial_dims == 3
    assert cfg.model.aux_loss == "prototype"  # the preset swaps in-batch SupCon for the per-sample contrast
    with pytest.raises(ConfigError, match="supcon"):
        compose(CT + ["privacy=eps8", "model.aux_loss=supcon"])
    assert _replaced_patient_effect("prototype").max() < 1e-5
    assert _replaced_patient_effect("supcon").max() > 1e-3  # the check catches the in-batch loss


def test_a_released_grade_table_noises_every_count_and_derives_the_rest_from_them(tmp_path):
    """Under a site's release policy no grading metric leaves unnoised: cells, screening counts and
    histograms are noised, per-grade F1 / macro averages / screening SEN-SPC follow from them."""
    from client.ledger import PrivacyLedger
    from client.release import release_counts
    from shared.config import PrivacyConfig
    from shared.grading import from_confusion

    labels, probs = _predictions(60, 7)
    exact = classification_metrics(labels, probs) | {"num-examples": 60, "loss": 1.0}
    policy = PrivacyConfig(release_noise="laplace", release_epsilon=1.0, release_budget=10.0)
    noisy = release_counts(exact, policy, PrivacyLedger.load(tmp_path), run_id="r", rnd=1, split="val", n_classes=4)
    assert set(noisy) == set(exact)
    counts = [k for k in exact if is_count_key(k)]
    assert all(noisy[k] != exact[k] for k in counts if exact[k] > 0)  # (a noised empty cell may clamp back to 0)
    cm = np.array([[noisy[f"cm_{t}{p}"] for p in range(4)] for t in range(4)])
    for key, value in from_confusion(cm).items():
        assert noisy[key] == pytest.approx(value), key
    tp, fn = noisy["screen_tp"], noisy["screen_fn"]
    assert noisy["screen_sen"] == pytest.approx(tp / (tp + fn))
    assert math.isnan(noisy["auc"]) and math.isnan(noisy["screen_auc"])  # score-based: withheld at the site
    assert 0.0 <= pool_grading([noisy])["screen_auc"] <= 1.0  # the server estimates it from the noised histograms
