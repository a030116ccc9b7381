"""Synthetic hospitals with a known ground truth: `fedmsk synth`.

Real multimodal hip data cannot leave a hospital, so development, tests and benchmarks run on
federations written here. They follow the site data contract exactly (``<site>/clinical.csv``
+ DICOM under ``<site>/images/``) so every loader, check and trainer is exercised as at a
hospital, and they carry what a hospital cannot give: ``<data_root>/oracle.csv``, each
patient's latent disease score, which bounds what any model can reach (``simulation.oracle``).

The latent model (also written to ``<data_root>/README.txt``) follows the AWGS/EWGSOP idea of
sarcopenia: low muscle mass together with low strength or slow gait.

- Appendicular skeletal muscle index (SMI, kg/m^2) = sex base (7.4 men, 5.9 women)
  + 0.09 (BMI - 24) - 0.030 (age - 72) + 0.55 u, where u ~ N(0, 1) is an individual term that
  only the image shows (thigh muscle size and density), never the table.
- Strength/gait reserve falls with age and rises with SMI: the latent score is
  s = muscle deficit + 0.45 * age term (a soft-plus past 70 years), with
  muscle deficit = (sex cut-off - SMI) / 0.55 (cut-offs 7.0 men, 5.7 women, AWGS 2019 DXA).
- Label = 1[s + e > t_site], e ~ N(0, 0.55): the label noise stands for the measurement
  noise of grip/gait and the clinician's judgement, so the oracle AUC is below 1 (~0.93).
  t_site is the quantile of s + e that gives the site's configured prevalence.
- Grip strength and gait speed are written (they are how a clinic would confirm the label) but
  are not model inputs; they are noisy functions of SMI and age.

Neither modality sees everything: the table has age, sex, height, weight and BMI but not u;
the image shows absolute thigh muscle (SMI x height^2, so sex and height confound it), muscle
density (u) and bone density (age and sex, noisily), but not age itself. A model that fuses
both beats either alone. Measured with cross-validated logistic regression on ~600 patients
(seed 0; clinical = age, sex, height, weight, BMI; image = 16x16 mean-pooled display pixels):
clinical 0.84, image 0.84, both 0.94, oracle 0.95 (seed 1: 0.84 / 0.81 / 0.93 / 0.95).

Sites differ the way hospitals do: size, prevalence, population (age and BMI shift), sex
spelling in the CSV, and scanner (CR or DX, MONOCHROME1 or MONOCHROME2, 10/12/16 stored bits,
pixel spacing, gamma, noise, rescale slope/intercept, default window). Each site also holds a
few deliberately unusable records (out-of-range age, a patient without an image, an image
without a clinical row) so `fedmsk check` has something to report.
"""

from __future__ import annotations

import csv
import hashlib
import io
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from shared.config import ConfigError, FedmskConfig
from simulation.anatomy import BodyParams, render_hip

MARKER = ".fedmsk-synth"
ORACLE_FILE = "oracle.csv"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
REFERENCE_SPACING_MM = 0.17

# --- latent model (documented in the module docstring and README.txt) -------------------------
SMI_BASE = {1: 7.4, 0: 5.9}  # kg/m^2 by sex code (1 = male)
SMI_CUTOFF = {1: 7.0, 0: 5.7}
SMI_BMI = 0.09
SMI_AGE = -0.030
SMI_HIDDEN = 0.55
SMI_SCALE = 0.55
AGE_WEIGHT = 0.7
LABEL_NOISE = 0.7


@dataclass(frozen=True)
class Scanner:
    """One site's X-ray system: how the ideal projection becomes stored DICOM values."""

    modality: str  # CR | DX
    photometric: str  # MONOCHROME1 stores inverted values (high = dark)
    bits_stored: int
    spacing_mm: float
    gamma: float
    noise: float
    slope: float
    intercept: float

    @property
    def spacing_tag(self) -> str:
        return "PixelSpacing" if self.modality == "CR" else "ImagerPixelSpacing"


@dataclass(frozen=True)
class SiteSpec:
    """Everything that makes one synthetic hospital different from the others."""

    name: str
    index: int
    patients: int
    prevalence: float
    missing_rate: float
    sex_spelling: tuple[str, str]  # (male, female) as this site writes it
    age_shift: float
    bmi_shift: float
    scanner: Scanner


_SEX_SPELLINGS = [("M", "F"), ("male", "female"), ("1", "0")]
_SCANNERS = [
    Scanner("DX", "MONOCHROME2", 12, 0.148, 1.0, 0.015, 1.0, 0.0),
    Scanner("CR", "MONOCHROME1", 10, 0.20, 0.8, 0.03, 1.0, 0.0),
    Scanner("DX", "MONOCHROME2", 16, 0.175, 1.25, 0.02, 0.5, -1024.0),
    Scanner("CR", "MONOCHROME2", 12, 0.16, 0.9, 0.025, 2.0, 0.0),
    Scanner("DX", "MONOCHROME1", 12, 0.139, 1.15, 0.01, 1.0, -100.0),
]


def site_name(index: int) -> str:
    """site_a ... site_z, then site_zaa, site_zab, ...: sorted order equals generation order."""
    letters = ""
    n = index
    while True:
        letters = chr(ord("a") + n % 26) + letters
        n = n // 26 - 1
        if n < 0:
            break
    return f"site_{letters}" if index < 26 else f"site_z{letters}"


def site_settings(cfg: FedmskConfig) -> list[tuple[int, int, float, float]]:
    """(index, patients, prevalence, missing rate) of every synthetic site, cfg.synth's lists
    cycled over the sites and checked; every task's generator starts from these."""
    s = cfg.synth
    for field_name in ("patients_per_site", "prevalence", "missing_rate"):
        if not getattr(s, field_name):
            raise ConfigError(f"config 'synth.{field_name}' is empty; give at least one value (cycled over sites)")
    out = []
    for i in range(cfg.num_sites):
        n = s.patients_per_site[i % len(s.patients_per_site)]
        prev = s.prevalence[i % len(s.prevalence)]
        miss = s.missing_rate[i % len(s.missing_rate)]
        if n < 10:
            raise ConfigError(f"config 'synth.patients_per_site' has {n}; a synthetic site needs at least 10 patients")
        if not 0.0 < prev < 1.0:
            raise ConfigError(f"config 'synth.prevalence' has {prev}; each value must be strictly between 0 and 1")
        if not 0.0 <= miss < 1.0:
            raise ConfigError(f"config 'synth.missing_rate' has {miss}; each value must be in [0, 1)")
        out.append((i, n, prev, miss))
    return out


def site_specs(cfg: FedmskConfig) -> list[SiteSpec]:
    """Per-site settings: cfg.synth lists cycled over the sites, scanners from a fixed palette."""
    s = cfg.synth
    specs = []
    for i, n, prev, miss in site_settings(cfg):
        rng = np.random.default_rng([cfg.seed, i, 7])
        specs.append(
            SiteSpec(
                name=site_name(i),
                index=i,
                patients=n,
                prevalence=prev,
                missing_rate=miss,
                sex_spelling=_SEX_SPELLINGS[i % len(_SEX_SPELLINGS)],
                age_shift=float(rng.normal(0.0, 2.5)),
                bmi_shift=float(rng.normal(0.0, 0.8)),
                scanner=_SCANNERS[i % len(_SCANNERS)],
            )
        )
    for field_name in ("image_signal", "clinical_signal"):
        if not 0.0 <= getattr(s, field_name) <= 5.0:
            raise ConfigError(f"config 'synth.{field_name}' is {getattr(s, field_name)}; use a weight in [0, 5] (1 = default mix)")
    if s.image_size < 32:
        raise ConfigError(f"config 'synth.image_size' is {s.image_size}; use at least 32 pixels")
    return specs


# --- population -------------------------------------------------------------------------------
@dataclass
class Population:
    """One site's patients, true values (before missingness and deliberate errors)."""

    sex: np.ndarray  # 1 male, 0 female
    age: np.ndarray
    height_cm: np.ndarray
    weight_kg: np.ndarray
    bmi: np.ndarray
    hidden: np.ndarray  # u: the individual muscle term only the image shows
    smi: np.ndarray
    bone_density: np.ndarray
    grip_kg: np.ndarray
    gait_m_s: np.ndarray
    latent: np.ndarray
    label: np.ndarray


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def latent_score(sex: np.ndarray, age: np.ndarray, smi: np.ndarray, clinical_signal: float = 1.0) -> np.ndarray:
    """The oracle's score: muscle deficit below the sex cut-off plus an age (strength/gait) term."""
    cutoff = np.where(sex == 1, SMI_CUTOFF[1], SMI_CUTOFF[0])
    return (cutoff - smi) / SMI_SCALE + clinical_signal * AGE_WEIGHT * _softplus((age - 70.0) / 6.0)


def sample_population(
    spec: SiteSpec, n: int, rng: np.random.Generator, image_signal: float = 1.0, clinical_signal: float = 1.0
) -> Population:
    """Draw ``n`` patients. ``image_signal`` scales the image-only muscle term u in SMI (and so in
    the label); ``clinical_signal`` scales what the table explains (the BMI and age terms of SMI
    and the age term of the score). 1.0 and 1.0 is the documented default mix."""
    sex = (rng.random(n) < 0.45).astype(np.int64)
    age = np.clip(rng.normal(72.0 + spec.age_shift, 8.0, n), 55.0, 97.0).round()
    height = np.where(sex == 1, rng.normal(169.0, 6.5, n), rng.normal(156.0, 6.0, n)) - 0.08 * (age - 72.0)
    bmi_true = np.clip(rng.normal(24.0 + spec.bmi_shift, 3.8, n), 16.0, 42.0)
    weight = bmi_true * (height / 100.0) ** 2
    hidden = rng.normal(0.0, 1.0, n)
    smi = (
        np.where(sex == 1, SMI_BASE[1], SMI_BASE[0])
        + clinical_signal * (SMI_BMI * (bmi_true - 24.0) + SMI_AGE * (age - 72.0))
        + image_signal * SMI_HIDDEN * hidden
    )
    bone = np.clip(1.0 - 0.012 * (age - 72.0) + 0.15 * sex + 0.15 * (smi - 6.6) + rng.normal(0, 0.15, n), 0.45, 1.6)
    grip = np.clip(
        np.where(sex == 1, 33.0, 21.0) + 4.0 * (smi - np.where(sex == 1, 7.4, 5.9)) - 0.3 * (age - 72.0) + rng.normal(0, 3.5, n),
        2.0,
        70.0,
    )
    gait = np.clip(1.05 - 0.012 * (age - 72.0) + 0.08 * (smi - 6.6) + rng.normal(0, 0.15, n), 0.2, 2.0)
    latent = latent_score(sex, age, smi, clinical_signal)
    noisy = latent + rng.normal(0.0, LABEL_NOISE, n)
    threshold = np.quantile(noisy, 1.0 - spec.prevalence)
    label = (noisy > threshold).astype(np.int64)
    return Population(sex, age, height, weight, bmi_true, hidden, smi, bone, grip, gait, latent, label)


def body_params(pop: Population, i: int, rng: np.random.Generator) -> BodyParams:
    """What patient i's radiograph shows: absolute thigh muscle, its density, fat and bone."""
    h = pop.height_cm[i] / 100.0
    asm = pop.smi[i] * h * h  # appendicular muscle mass, kg
    fat_factor = np.where(pop.sex[i] == 1, 1.0, 1.4)
    return BodyParams(
        muscle_radius=float(np.clip(11.0 * np.sqrt(asm), 20.0, 52.0)),
        muscle_density=float(np.clip(0.95 + 0.07 * pop.hidden[i], 0.75, 1.15)),
        fat_thickness=float(np.clip(fat_factor * (0.9 * (pop.bmi[i] - 15.0)) + rng.normal(0, 1.0), 1.5, 25.0)),
        bone_density=float(pop.bone_density[i]),
        bone_scale=float(pop.height_cm[i] / 163.0),
        shift_x=float(rng.normal(0, 2.5)),
        shift_y=float(rng.normal(0, 2.5)),
        angle_deg=float(rng.normal(0, 2.0)),
        zoom=float(rng.normal(1.0, 0.03)),
    )


# --- scanner and DICOM ------------------------------------------------------------------------
def acquire(ideal: np.ndarray, sc: Scanner, rng: np.random.Generator) -> np.ndarray:
    """Ideal projection [0,1] -> stored pixel values (uint16) as this scanner writes them."""
    signal = np.power(np.clip(ideal, 0.0, 1.0), sc.gamma)
    signal = np.clip(signal + rng.normal(0.0, sc.noise, signal.shape), 0.0, 1.0)
    lo, hi = _stored_range(sc)
    stored = np.rint(lo + signal * (hi - lo))
    if sc.photometric == "MONOCHROME1":
        stored = (2**sc.bits_stored - 1) - stored
    return stored.astype(np.uint16)


def _stored_range(sc: Scanner) -> tuple[int, int]:
    top = 2**sc.bits_stored - 1
    return int(0.04 * top), int(0.96 * top)


def _window(sc: Scanner) -> tuple[float, float]:
    """The site's default window (centre, width) in rescaled units, covering the stored range."""
    lo, hi = _stored_range(sc)
    if sc.photometric == "MONOCHROME1":
        top = 2**sc.bits_stored - 1
        lo, hi = top - hi, top - lo
    a, b = lo * sc.slope + sc.intercept, hi * sc.slope + sc.intercept
    return round((a + b) / 2.0, 1), round(b - a, 1)


def dicom_dataset(
    pixels: np.ndarray, sc: Scanner, patient_id: str, sex: str, uids: tuple[str, str, str], study_date: str
) -> Dataset:
    """A minimal but valid CR/DX image: what the loaders must handle, nothing they cannot."""
    study_uid, series_uid, sop_uid = uids
    sop_class = CR_STORAGE if sc.modality == "CR" else DX_STORAGE
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid(entropy_srcs=["fedmsk-synth"])
    meta.ImplementationVersionName = "FEDMSK_SYNTH"

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.PatientName = f"SYNTH^{patient_id}"
    ds.PatientSex = sex
    ds.StudyDate = study_date
    ds.StudyTime = "090000"
    ds.AccessionNumber = sop_uid[-12:]
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = sc.modality
    ds.Manufacturer = "fedmsk synthetic"
    ds.BodyPartExamined = "HIP"
    ds.ViewPosition = "AP"
    ds.SeriesDescription = "HIP AP"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = sc.photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = sc.bits_stored
    ds.HighBit = sc.bits_stored - 1
    ds.PixelRepresentation = 0
    setattr(ds, sc.spacing_tag, [f"{sc.spacing_mm:.3f}", f"{sc.spacing_mm:.3f}"])
    ds.RescaleSlope = f"{sc.slope:g}"
    ds.RescaleIntercept = f"{sc.intercept:g}"
    ds.RescaleType = "US"
    center, width = _window(sc)
    ds.WindowCenter = f"{center:g}"
    ds.WindowWidth = f"{width:g}"
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


# --- the federation ---------------------------------------------------------------------------
def _fmt(value: float, digits: int) -> str:
    return "" if np.isnan(value) else f"{value:.{digits}f}"


def _write_site(
    root: Path, spec: SiteSpec, cfg: FedmskConfig, advance: Callable[[], None]
) -> list[tuple[str, str, float, int]]:
    """Write one site folder; return its oracle rows (site, patient_id, latent, label)."""
    rng = np.random.default_rng([cfg.seed, spec.index, 1])
    n = spec.patients
    pop = sample_population(spec, n + 1, rng, cfg.synth.image_signal, cfg.synth.clinical_signal)  # the extra patient is the image without a clinical row
    ids_num = rng.choice(np.arange(100000, 999999), size=n + 1, replace=False)
    letter = spec.name.removeprefix("site_").upper()
    ids = [f"{letter}{k}" for k in ids_num]

    # missingness: optional columns at the site's rate, impute columns at a small rate
    gait = pop.gait_m_s.copy()
    grip = pop.grip_kg.copy()
    gait[rng.random(n + 1) < spec.missing_rate] = np.nan
    grip[rng.random(n + 1) < spec.missing_rate / 2.0] = np.nan
    height = pop.height_cm.copy()
    weight = pop.weight_kg.copy()
    small = min(0.03, spec.missing_rate / 2.0)
    height[rng.random(n + 1) < small] = np.nan
    weight[rng.random(n + 1) < small] = np.nan
    bmi = np.where(np.isnan(height) | np.isnan(weight), np.nan, pop.bmi)

    # deliberately unusable records (documented in README.txt)
    bad_age, no_image = (int(k) for k in rng.choice(n, size=2, replace=False))
    # patient n (the extra one): image written, no clinical row
    age = pop.age.copy()
    age[bad_age] = 150.0

    no_label = _unlabelled_rows(cfg, spec, n)
    site_dir = root / spec.name
    (site_dir / "images").mkdir(parents=True)
    male, female = spec.sex_spelling
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    label_col = cfg.task.label_column
    w.writerow(["patient_id", "age", "sex", "height_cm", "weight_kg", "bmi", "grip_strength_kg", "gait_speed_m_s", label_col])
    for i in range(n):
        w.writerow(
            [
                ids[i],
                f"{age[i]:.0f}",
                male if pop.sex[i] == 1 else female,
                _fmt(height[i], 1),
                _fmt(weight[i], 1),
                _fmt(bmi[i], 1),
                _fmt(grip[i], 1),
                _fmt(gait[i], 2),
                "" if i in no_label else int(pop.label[i]),
            ]
        )
    (site_dir / "clinical.csv").write_text(buf.getvalue())

    sc = spec.scanner
    size = cfg.synth.image_size
    scale = REFERENCE_SPACING_MM / sc.spacing_mm
    study_order = rng.permutation(n + 1)  # file numbers do not follow the CSV order
    for i in range(n + 1):
        img_rng = np.random.default_rng([cfg.seed, spec.index, 2, i])
        if i == no_image:
            advance()
            continue
        ideal = render_hip(body_params(pop, i, img_rng), size, scale)
        pixels = acquire(ideal, sc, img_rng)
        ent = [str(cfg.seed), spec.name, ids[i]]
        uids = (
            generate_uid(entropy_srcs=[*ent, "study"]),
            generate_uid(entropy_srcs=[*ent, "series"]),
            generate_uid(entropy_srcs=[*ent, "instance"]),
        )
        day = int(img_rng.integers(1, 29))
        month = int(img_rng.integers(1, 13))
        ds = dicom_dataset(pixels, sc, ids[i], "M" if pop.sex[i] == 1 else "F", uids, f"2023{month:02d}{day:02d}")
        # a PACS export by month, files numbered in export order (one folder per study would
        # cost a directory per image, slow on network file systems, and tells a loader nothing)
        folder = site_dir / "images" / f"2023{month:02d}"
        folder.mkdir(exist_ok=True)
        ds.save_as(folder / f"IM{study_order[i] + 1:05d}.dcm", enforce_file_format=True)
        advance()
    return [(spec.name, ids[i], float(pop.latent[i]), int(pop.label[i])) for i in range(n)]


def _unlabelled_rows(cfg: FedmskConfig, spec: SiteSpec, n: int) -> set[int]:
    """Rows written with an empty label (``synth.unlabelled_fraction``), drawn from their own random
    stream so every other value of the site is the same draw as without them; oracle.csv keeps
    their true label (training never reads it)."""
    k = round(n * cfg.synth.unlabelled_fraction)
    if k == 0:
        return set()
    return {int(i) for i in np.random.default_rng([cfg.seed, spec.index, 3]).choice(n, size=k, replace=False)}


def _readme(cfg: FedmskConfig, specs: list[SiteSpec]) -> str:
    lines = [
        "fedmsk synthetic federation (written by `fedmsk synth`; safe to delete and regenerate)",
        f"seed={cfg.seed} num_sites={cfg.num_sites} image_size={cfg.synth.image_size} "
        f"image_signal={cfg.synth.image_signal} clinical_signal={cfg.synth.clinical_signal}",
        "",
        "Layout: <site>/clinical.csv, <site>/images/<YYYYMM>/IM*.dcm (linked by PatientID, not by name);",
        "oracle.csv (site,patient_id,latent_score,label) lies outside the site folders and is never",
        "read by training: it gives the best score any model can reach (simulation/oracle.py).",
        "",
        "Latent model (sarcopenia = low muscle mass with low strength or slow gait, AWGS/EWGSOP):",
        f"  SMI [kg/m2] = {SMI_BASE[1]} (men) / {SMI_BASE[0]} (women) + c*({SMI_BMI}*(BMI-24) {SMI_AGE:+}*(age-72))",
        f"                + i*{SMI_HIDDEN}*u,  u ~ N(0,1) an individual term visible only in the image",
        f"  latent s = (cutoff_sex - SMI)/{SMI_SCALE} + c*{AGE_WEIGHT}*softplus((age-70)/6),",
        f"  with c = synth.clinical_signal = {cfg.synth.clinical_signal}, i = synth.image_signal = {cfg.synth.image_signal}",
        f"             cutoff {SMI_CUTOFF[1]} (men) / {SMI_CUTOFF[0]} (women)",
        f"  label = 1[s + e > t_site], e ~ N(0, {LABEL_NOISE}); t_site gives the site's prevalence exactly",
        "  grip_strength_kg and gait_speed_m_s: noisy functions of SMI and age (not model inputs)",
        "Image (AP hip + thigh): thigh muscle radius ~ sqrt(SMI*height^2) (absolute muscle),",
        "  muscle brightness ~ u (density), subcutaneous fat ~ BMI (thicker in women),",
        "  bone cortex/trabecular brightness ~ bone density (falls with age, lower in women),",
        "  patient positioning jitter (shift, rotation, zoom). The table lacks u; the image lacks",
        "  age, sex and height: each modality carries part of the signal.",
        "",
        "Sites:",
    ]
    for sp in specs:
        sc = sp.scanner
        lines.append(
            f"  {sp.name}: {sp.patients} patients, prevalence {sp.prevalence:.2f}, missing rate {sp.missing_rate:.2f}, "
            f"sex written {sp.sex_spelling[0]}/{sp.sex_spelling[1]}, {sc.modality} {sc.photometric} "
            f"{sc.bits_stored}-bit, {sc.spacing_tag} {sc.spacing_mm} mm, gamma {sc.gamma}, noise {sc.noise}, "
            f"rescale {sc.slope:g}/{sc.intercept:g}"
        )
    lines += [
        "",
        "Deliberately unusable records at every site (what `fedmsk check` should report):",
        "  - one clinical row with age 150 (outside the task's range; its image exists),",
        "  - one clinical row whose patient has no image,",
        "  - one image whose PatientID has no clinical row.",
        f"Unlabelled patients: {cfg.synth.unlabelled_fraction:.0%} of each site's rows have an empty label "
        "(synth.unlabelled_fraction; oracle.csv keeps their label).",
        "Missing values: gait_speed_m_s at the site's missing rate, grip_strength_kg at half of it,",
        "height_cm and weight_kg at min(0.03, rate/2) each (bmi is then empty too).",
        "",
    ]
    return "\n".join(lines)


def _prepare_root(root: Path) -> None:
    """Refuse to overwrite a folder synth did not write; replace one it did."""
    if root.exists():
        if not root.is_dir():
            raise ConfigError(f"data_root {root} is a file; set data_root= to a folder")
        if any(root.iterdir()) and not (root / MARKER).is_file():
            raise ConfigError(
                f"data_root {root} exists and was not written by `fedmsk synth` (no {MARKER} marker); "
                "refusing to overwrite it: pass another data_root= or remove the folder yourself"
            )


def total_steps(cfg: FedmskConfig) -> int:
    """Images to draw (one progress step each)."""
    return sum(sp.patients + 1 for sp in site_specs(cfg))


def write_federation(cfg: FedmskConfig, advance: Callable[[], None] | None = None) -> Path:
    """Write cfg.num_sites synthetic sites + oracle.csv + README.txt under cfg.data_root.

    Deterministic in cfg.seed (same seed: identical CSVs and DICOM files). ``advance`` is
    called once per image.
    """
    specs = site_specs(cfg)
    step = advance or (lambda: None)
    return publish_federation(Path(cfg.data_root), specs,
                              lambda tmp, spec: [oracle_row(*r) for r in _write_site(tmp, spec, cfg, step)],
                              lambda: _readme(cfg, specs), f"seed {cfg.seed}")


def oracle_row(site: str, patient_id: str, latent_score: float, label: int) -> dict[str, str]:
    """One oracle.csv row of the radiograph generators (site, patient, latent score, label)."""
    return {"site": site, "patient_id": patient_id, "latent_score": f"{latent_score:.6f}", "label": str(label)}


def publish_federation(data_root: Path, specs: Sequence[Any], write_site: Callable[[Path, Any], list[dict[str, str]]],
                       readme: Callable[[], str], what: str) -> Path:
    """Write a federation beside ``data_root`` and swap it in at the end, so an interrupted
    run never leaves a half-written federation where the old one was (every task's generator).

    ``write_site(tmp, spec)`` writes one site folder under ``tmp`` and returns its oracle.csv rows
    (the same keys for every row); ``readme()`` is README.txt's text; the marker file records
    ``what`` and the oracle's hash.
    """
    root = data_root.resolve()
    _prepare_root(root)
    tmp = root.with_name(root.name + ".synth-tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    oracle: list[dict[str, str]] = []
    for spec in specs:
        oracle += write_site(tmp, spec)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(oracle[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(oracle)
    oracle_text = buf.getvalue()
    (tmp / ORACLE_FILE).write_text(oracle_text)
    (tmp / "README.txt").write_text(readme())
    digest = hashlib.sha256(oracle_text.encode()).hexdigest()[:16]
    (tmp / MARKER).write_text(f"written by fedmsk synth, {what}, oracle sha256 {digest}\n")
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
    return root
