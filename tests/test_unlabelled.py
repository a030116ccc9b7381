"""Unlabelled patients and task.label_fraction: counted by `fedmsk check`, used by no supervised
training, and label subsets that are stratified, nested, reproducible and never touch val/test."""

from __future__ import annotations

import csv
from collections import Counter

import numpy as np
import pytest
from rich.console import Console

from client.check import check_site
from dicom_factory import ramp, task_config, valid_row, write_site
from shared.config import ConfigError, compose, to_yaml
from shared.sitedata import label_subset, load_site, make_datasets, site_splits

TASK = dict(image_size=[16, 16])


def _unlabelled_row(pid: str) -> str:
    return valid_row(pid).rsplit(",", 1)[0] + ","


@pytest.fixture(scope="module")
def mixed_site(tmp_path_factory):
    """30 labelled patients (10 positive), 6 unlabelled with images, 1 unlabelled without an image."""
    root = tmp_path_factory.mktemp("mixed") / "hospital"
    labelled = [valid_row(f"L{i:02d}", label=int(i % 3 == 0), age=60 + i) for i in range(30)]
    unlabelled = [_unlabelled_row(f"U{i}") for i in range(6)] + [_unlabelled_row("UNOIMG")]
    rows = labelled[:15] + unlabelled[:3] + labelled[15:] + unlabelled[3:]  # interleaved in the CSV
    images = {f"L{i:02d}": ramp() for i in range(30)} | {f"U{i}": ramp() for i in range(6)}
    return write_site(root, rows, images=images)


def test_check_counts_labelled_and_unlabelled_usable_patients(mixed_site):
    result = check_site(mixed_site, task_config(**TASK, min_usable=30), Console(quiet=True))
    assert result.summary["usable_patients"] == 30 and result.summary["unlabelled_patients"] == 6
    assert result.ok and "30 usable labelled patients" in result.verdict
    # an unlabelled patient's records are checked like the others: the missing image is its finding
    assert result.summary["unusable_patients_by_reason"] == {"patient_without_image": 1}
    with result.report.open(newline="") as fh:
        assert [r["record"] for r in csv.DictReader(fh) if r["reason"] == "patient_without_image"] == ["UNOIMG"]
    # min_usable counts labelled patients only: 36 usable, 30 labelled, 31 asked for -> not ready
    short = check_site(mixed_site, task_config(**TASK, min_usable=31), Console(quiet=True))
    assert not short.ok and "30 usable labelled patients, the task needs at least 31" in short.verdict


def test_supervised_training_skips_unlabelled_patients(mixed_site):
    import client.app as client_app

    task = task_config(**TASK)
    site = load_site(mixed_site, task)
    assert site.unlabelled == 7 and not any(p.startswith("U") for p in site.patient_ids)
    assert not [i for i in site.issues if i.patient_id.startswith("U")]  # a count, not an error
    everyone = load_site(mixed_site, task, labelled_only=False)
    assert sorted(p for p, y in zip(everyone.patient_ids, everyone.labels) if y < 0) == [f"U{i}" for i in range(6)]
    # the same val/test/train patients whether or not the unlabelled ones were loaded
    a, b = site_splits(site, task, seed=3), site_splits(everyone, task, seed=3)
    for name in ("train", "val", "test"):
        assert [site.patient_ids[i] for i in a[name]] == [everyone.patient_ids[i] for i in b[name]]
    assert sorted(everyone.patient_ids[i] for i in b["unlabelled"]) == [f"U{i}" for i in range(6)]
    sets = make_datasets(everyone, task, seed=3, unlabelled=True)
    assert all(int(sets["train"][i]["label"]) >= 0 for i in range(len(sets["train"])))
    assert {int(sets["unlabelled"][i]["label"]) for i in range(6)} == {-1}
    # the ClientApp's training set (what every round trains on) holds the labelled training patients only
    cfg = compose(["task.image_size=[16,16]"])
    train = client_app._site_datasets(str(mixed_site), to_yaml(cfg), 3, False)["train"]
    assert len(train) == len(a["train"]) == 30 - len(a["val"]) - len(a["test"])


def test_label_fraction_is_stratified_nested_reproducible_and_leaves_val_test_alone(mixed_site):
    everyone = load_site(mixed_site, task_config(**TASK), labelled_only=False)
    full = site_splits(everyone, task_config(**TASK), seed=5)
    per_class = Counter(int(everyone.labels[i]) for i in full["train"])
    chosen = {}
    for fraction in (0.1, 0.25, 0.5):
        split = site_splits(everyone, task_config(**TASK, label_fraction=fraction), seed=5)
        assert np.array_equal(split["val"], full["val"]) and np.array_equal(split["test"], full["test"])
        kept = Counter(int(everyone.labels[i]) for i in split["train"])
        assert kept == {c: max(1, round(n * fraction)) for c, n in per_class.items()}
        held = set(full["train"]) - set(split["train"])
        assert set(split["unlabelled"]) == held | set(full["unlabelled"])  # held-back labels act as unlabelled
        chosen[fraction] = set(split["train"])
    assert chosen[0.1] <= chosen[0.25] <= chosen[0.5]  # nested for one seed
    again = site_splits(everyone, task_config(**TASK, label_fraction=0.25), seed=5)
    assert set(again["train"]) == chosen[0.25]
    other = site_splits(everyone, task_config(**TASK, label_fraction=0.25), seed=6)
    assert [everyone.patient_ids[i] for i in other["train"]] != [everyone.patient_ids[i] for i in again["train"]]
    # held-back patients reach a supervised dataset only as label -1
    sets = make_datasets(everyone, task_config(**TASK, label_fraction=0.25), seed=5, unlabelled=True)
    assert len(sets["train"]) == len(chosen[0.25]) and len(sets["unlabelled"]) == len(full["train"]) - len(chosen[0.25]) + 6


def test_label_subset_keeps_a_patients_views_together():
    labels = np.array([0, 0, 1, 1, 0, 0, 1, 1] * 5)
    groups = [f"p{i // 2}" for i in range(len(labels))]  # two views per patient
    keep = label_subset(labels, 0.3, seed=0, groups=groups)
    kept = {groups[i] for i in keep}
    assert sorted(keep) == sorted(i for i, g in enumerate(groups) if g in kept)  # both views or neither
    assert Counter(labels[i] for i in keep) == {0: 6, 1: 6}  # 3 of 10 patients per class, 2 rows each


@pytest.mark.parametrize("override", ["task.label_fraction=0", "task.label_fraction=1.5", "synth.unlabelled_fraction=1"])
def test_fractions_out_of_range_are_config_errors(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        compose([override])


def test_synth_writes_unlabelled_patients_without_changing_the_rest(tmp_path):
    from simulation.synth import write_federation

    base = ["num_sites=1", "synth.patients_per_site=[30]", "synth.image_size=32"]
    tables = {}
    for fraction in (0.0, 0.2):
        cfg = compose(base + [f"synth.unlabelled_fraction={fraction}", f"data_root={tmp_path / str(fraction)}"])
        write_federation(cfg)
        with (tmp_path / str(fraction) / "site_a" / "clinical.csv").open(newline="") as fh:
            tables[fraction] = list(csv.DictReader(fh))
    plain, mixed = tables[0.0], tables[0.2]
    empty = [i for i, row in enumerate(mixed) if row["sarcopenia"] == ""]
    assert len(empty) == 6 and not any(row["sarcopenia"] == "" for row in plain)
    for i, (a, b) in enumerate(zip(plain, mixed)):  # every other cell is the same draw
        assert {k: v for k, v in a.items() if k != "sarcopenia" or i not in empty} == \
               {k: v for k, v in b.items() if k != "sarcopenia" or i not in empty}
