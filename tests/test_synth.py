"""Synthetic hospitals: determinism, the site data contract, scanner variety, the oracle, and
the property the benchmarks rely on: neither modality alone carries the whole signal."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cli.main import main as fedmsk_main
from shared.config import ConfigError, compose
from simulation.anatomy import REF_SIZE
from simulation.oracle import oracle_auc, read_oracle
from simulation.synth import MARKER, REFERENCE_SPACING_MM, write_federation

SIZES = [150, 130, 120]


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("synth") / "fed"
    cfg = compose([f"data_root={root}", "num_sites=3", f"synth.patients_per_site={SIZES}", "synth.image_size=64"])
    write_federation(cfg)
    return cfg, root


def _rows(site_dir: Path) -> list[dict[str, str]]:
    with (site_dir / "clinical.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _images(site_dir: Path) -> dict[str, pydicom.Dataset]:
    return {ds.PatientID: ds for ds in (pydicom.dcmread(p) for p in sorted(site_dir.glob("images/**/*.dcm")))}


def _display(ds: pydicom.Dataset) -> np.ndarray:
    """Stored values -> [0,1] with bone bright: rescale, the file's window, MONOCHROME1 inverted."""
    v = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    v = np.clip((v - (c - w / 2)) / w, 0.0, 1.0)
    return 1.0 - v if ds.PhotometricInterpretation == "MONOCHROME1" else v


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_files_other_seed_differs(tmp_path: Path) -> None:
    def make(name: str, seed: int) -> Path:
        over = [f"data_root={tmp_path / name}", f"seed={seed}", "num_sites=2", "synth.patients_per_site=[20,15]",
                "synth.image_size=32"]
        return write_federation(compose(over))

    a, b, c = make("a", 5), make("b", 5), make("c", 6)
    files_a, files_b, files_c = _all_bytes(a), _all_bytes(b), _all_bytes(c)
    assert files_a == files_b  # CSVs, README, oracle and every DICOM byte
    assert files_a["site_a/clinical.csv"] != files_c["site_a/clinical.csv"]
    pix = lambda root: sorted(ds.pixel_array.tobytes() for ds in _images(root / "site_a").values())  # noqa: E731
    assert set(pix(a)).isdisjoint(pix(c))


def test_sites_follow_the_data_contract(fed) -> None:
    cfg, root = fed
    sites = sorted(p.name for p in root.iterdir() if (p / "clinical.csv").is_file())
    assert sites == ["site_a", "site_b", "site_c"]
    expected_cols = ["patient_id", *[c.name for c in cfg.task.columns], cfg.task.label_column]
    age_spec = next(c for c in cfg.task.columns if c.name == "age")
    accepted_sex = {k.lower() for k in next(c for c in cfg.task.columns if c.name == "sex").categories}
    spellings = set()
    for site, n in zip(sites, SIZES):
        rows = _rows(root / site)
        images = _images(root / site)
        assert list(rows[0]) == expected_cols and len(rows) == n
        ids = [r["patient_id"] for r in rows]
        assert len(set(ids)) == n
        # the documented unusable records: one without image, one orphan image, one age out of range
        assert len(set(ids) - set(images)) == 1
        assert len(set(images) - set(ids)) == 1
        assert sum(not age_spec.min <= float(r["age"]) <= age_spec.max for r in rows) == 1
        sexes = {r["sex"] for r in rows}
        assert {s.lower() for s in sexes} <= accepted_sex
        spellings.add(frozenset(sexes))
        assert 0 < sum(r["gait_speed_m_s"] == "" for r in rows) < n / 4
        assert not any("/" + pid in str(p) for pid in ids for p in (root / site).glob("images/**/*.dcm"))
        ds = next(iter(images.values()))
        assert ds.pixel_array.shape == (64, 64) and ds.BitsAllocated == 16 and ds.Modality in ("CR", "DX")
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        # the default window covers the stored values actually used
        vals = np.concatenate([d.pixel_array.ravel() for d in images.values()]) * float(ds.RescaleSlope)
        vals = vals + float(ds.RescaleIntercept)
        c, w = float(ds.WindowCenter), float(ds.WindowWidth)
        assert c - w / 2 <= vals.min() and vals.max() <= c + w / 2
        assert vals.max() < 2**ds.BitsStored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert len(spellings) == 3  # each site spells sex its own way


def test_monochrome1_site_stores_inverted_values(fed) -> None:
    """Mean over a site's images: the femoral shaft must be brighter than the lateral thigh once
    displayed, and on a MONOCHROME1 site the *stored* values must say the opposite."""
    _, root = fed
    photometric = set()
    for site in ("site_a", "site_b", "site_c"):
        images = list(_images(root / site).values())
        ds = images[0]
        spacing = float((ds.get("PixelSpacing") or ds.ImagerPixelSpacing)[0])
        scale, k = REFERENCE_SPACING_MM / spacing, ds.Rows / REF_SIZE

        def at(x: float, y: float) -> tuple[int, int]:  # reference-frame point -> detector pixel
            c = REF_SIZE / 2
            return int(((y - c) * scale + c) * k), int(((x - c) * scale + c) * k)

        shaft, soft = at(55.0, 95.0), at(30.0, 95.0)
        shown = np.mean([_display(d) for d in images], axis=0)
        stored = np.mean([d.pixel_array.astype(np.float64) for d in images], axis=0)
        assert shown[shaft] > shown[soft] + 0.1
        if ds.PhotometricInterpretation == "MONOCHROME1":
            assert stored[shaft] < stored[soft]
        else:
            assert stored[shaft] > stored[soft]
        photometric.add((ds.PhotometricInterpretation, ds.BitsStored))
    assert {p for p, _ in photometric} == {"MONOCHROME1", "MONOCHROME2"}
    assert len({b for _, b in photometric}) == 3


def test_prevalence_and_oracle(fed) -> None:
    cfg, root = fed
    oracle = read_oracle(root)
    assert (root / "oracle.csv").is_file()
    assert not any((root / s / "oracle.csv").exists() for s in ("site_a", "site_b", "site_c"))
    keys = []
    for site, prevalence in zip(("site_a", "site_b", "site_c"), cfg.synth.prevalence):
        rows = _rows(root / site)
        labels = [int(r["sarcopenia"]) for r in rows]
        assert abs(np.mean(labels) - prevalence) < 0.02
        site_keys = [(site, r["patient_id"]) for r in rows]
        assert [oracle[k][1] for k in site_keys] == labels
        keys += site_keys
    assert set(keys) == set(oracle)
    assert 0.8 < oracle_auc(root, keys) < 0.99
    with pytest.raises(KeyError):
        oracle_auc(root, [("site_a", "nobody")])


def test_each_modality_carries_only_part_of_the_signal(fed) -> None:
    """Cross-validated logistic regression: table alone and image alone both trail the two fused."""
    _, root = fed
    sex_code = {"m": 1, "male": 1, "1": 1, "f": 0, "female": 0, "0": 0}
    clinical, pixels, labels = [], [], []
    for site in ("site_a", "site_b", "site_c"):
        images = _images(root / site)
        for r in _rows(root / site):
            if r["patient_id"] not in images or float(r["age"]) > 110:
                continue
            vals = [float(r[c]) if r[c] else np.nan for c in ("age", "height_cm", "weight_kg", "bmi")]
            clinical.append([vals[0], sex_code[r["sex"].lower()], *vals[1:]])
            img = _display(images[r["patient_id"]])
            pixels.append(img.reshape(16, 4, 16, 4).mean(axis=(1, 3)).ravel())
            labels.append(int(r["sarcopenia"]))
    x_clin = np.array(clinical)
    x_clin = np.where(np.isnan(x_clin), np.nanmedian(x_clin, axis=0), x_clin)
    x_img, y = np.array(pixels), np.array(labels)
    assert len(y) > 380

    def cv_auc(x: np.ndarray) -> float:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))
        cv = StratifiedKFold(5, shuffle=True, random_state=0)
        return roc_auc_score(y, cross_val_predict(model, x, y, cv=cv, method="predict_proba")[:, 1])

    auc_clin, auc_img, auc_both = cv_auc(x_clin), cv_auc(x_img), cv_auc(np.hstack([x_clin, x_img]))
    assert auc_clin > 0.7 and auc_img > 0.7  # each modality does carry signal
    assert auc_both > max(auc_clin, auc_img) + 0.04, (auc_clin, auc_img, auc_both)


def test_overwrite_only_what_synth_wrote(tmp_path: Path) -> None:
    root = tmp_path / "fed"
    over = [f"data_root={root}", "num_sites=1", "synth.patients_per_site=[12]", "synth.image_size=32"]
    root.mkdir()
    (root / "patients.xlsx").write_text("a hospital's real data")
    with pytest.raises(ConfigError, match="data_root"):
        write_federation(compose(over))
    assert (root / "patients.xlsx").is_file()

    other = tmp_path / "fed2"
    write_federation(compose([f"data_root={other}", *over[1:]]))
    (other / "stale.txt").write_text("left from an older federation")
    write_federation(compose([f"data_root={other}", *over[1:]]))
    assert (other / MARKER).is_file() and not (other / "stale.txt").exists()
    with pytest.raises(ConfigError, match="synth.prevalence"):
        write_federation(compose([f"data_root={tmp_path / 'x'}", "synth.prevalence=[1.2]"]))


def test_cli_writes_and_tabulates(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "160")  # a wide terminal: rich does not elide the table's cells
    root = tmp_path / "cli"
    rc = fedmsk_main(["synth", f"data_root={root}", "num_sites=2", "synth.patients_per_site=[12]", "synth.image_size=32"])
    out = capsys.readouterr().out
    assert rc == 0 and "site_b" in out and "MONOCHROME1" in out
    assert len(_rows(root / "site_b")) == 12


def test_signal_strengths_set_how_much_each_modality_explains() -> None:
    """synth.image_signal / synth.clinical_signal weight the image-only term u and the table's terms."""
    from simulation.synth import sample_population, site_specs

    spec = site_specs(compose(["num_sites=1"]))[0]

    def corr(image_signal: float, clinical_signal: float) -> tuple[float, float]:
        pop = sample_population(spec, 4000, np.random.default_rng(0), image_signal, clinical_signal)
        return np.corrcoef(pop.latent, pop.hidden)[0, 1], np.corrcoef(pop.latent, pop.age)[0, 1]

    hidden_default, age_default = corr(1.0, 1.0)
    hidden_image, age_image = corr(1.5, 0.7)
    assert abs(hidden_default) > 0.3 and abs(age_default) > 0.3
    assert abs(hidden_image) > abs(hidden_default) + 0.05 and abs(age_image) < abs(age_default) - 0.05
    assert abs(corr(0.0, 1.0)[0]) < 0.05  # no image-only term: the table explains the score alone
    with pytest.raises(ConfigError, match="synth.image_signal"):
        site_specs(compose(["num_sites=1", "synth.image_signal=-1"]))
